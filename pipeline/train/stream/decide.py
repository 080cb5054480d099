"""Decide: what the run does with one element, as a pure function of the seed and the element.

The embedding variant (language, dropped text, inverse edit) and the crop offsets of
a sample come from (seed, task, N, element) alone, applied once right after the
sample is read. So read-ahead knows which embedding to fetch with the sample, a
replacement keeps its own draws, and a resumed run — on any number of ranks and
workers — makes the same choices for the same element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.shards.format import VARIANT_TEXT
from pipeline.train.config.data import StreamConfig
from pipeline.train.stream.seeding import CROP, VARIANT, stable_id


@dataclass(frozen=True)
class Choice:
    """The run's draws for one element."""

    variant: str  # an embedding variant, "drop"/"drop_inv" (empty text), or "null" (the task's null embedding)
    text: str
    inverse: bool  # target and source 0 swapped
    fraction: tuple[float, float]  # where the crop sits in the room the image leaves (x, y), each in [0, 1)


def choose_variant(
    meta: dict[str, Any], rng: np.random.Generator, enable_inverse: bool, drop_ratio: float, stored: bool = True
) -> tuple[str, str, bool]:
    """(variant, text, inverse?) for one sample; variant "null" means the task's null embedding.

    ``stored``: only variants with a stored embedding count (offline); otherwise any non-empty text (online).
    """
    present = meta.get("variants", {})
    options = [v for v in ("en", "cn") if meta.get(VARIANT_TEXT[v]) and (v in present or not stored)]
    if enable_inverse and meta["num_sources"] == 1:
        options += [v for v in ("en_inv", "cn_inv") if meta.get(VARIANT_TEXT[v]) and (v in present or not stored)]
    chosen = options[int(rng.integers(len(options)))] if options else None
    dropped = rng.random() < drop_ratio or chosen is None
    inverse = chosen is not None and chosen.endswith("_inv")
    if not dropped:
        return chosen, meta[VARIANT_TEXT[chosen]], inverse
    if meta["num_sources"] == 0:
        return "null", "", False
    return ("drop_inv" if inverse else "drop"), "", inverse


def decide(meta: dict[str, Any], config: StreamConfig, task: str, n: int, element: tuple[int, ...]) -> Choice:
    """The draws for ``element`` of stream (task, N): the same in every process, layout and resume."""
    keys = (stable_id(task), n, *element)
    variant, text, inverse = choose_variant(
        meta,
        VARIANT.rng(config.seed, *keys),
        config.enable_inverse,
        config.text_drop_ratio,
        stored=not config.online_prompts,
    )
    x, y = CROP.rng(config.seed, *keys).random(2)
    return Choice(variant, text, inverse, (float(x), float(y)))
