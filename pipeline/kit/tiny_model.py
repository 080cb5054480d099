"""The offline tiny model of a model family: the same classes, configs and file layout as the published model, tiny
widths and random weights, seeded (the same seed gives byte-identical weight files). Real weights cannot be
downloaded in CI, so tests, the demo and CI run on it. Each family builds its own (``pipeline/families/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import families


def make_tiny_model(
    out_dir: str | Path, seed: int = 0, size: Any = "tiny", variant: str | None = None, family: str | None = None
) -> Path:
    """Write the tiny model of ``family`` (default: Qwen-Image-Edit; ``variant`` 2509 or 2511) to ``out_dir``;
    ``size``: a name of the family's sizes (``tiny``, ``bench``) or one of its size objects."""
    return families.get(family).make_tiny_model(out_dir, seed, size, variant)
