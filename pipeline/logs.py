"""Logging set-up shared by the CLIs: one format, the rank in every prefix."""

from __future__ import annotations

import logging
import os


def process_rank() -> int:
    """Global rank from the torchrun / accelerate environment (0 when launched alone)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger with ``[rank R]`` in the prefix; returns the project logger."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {process_rank()}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    return logging.getLogger("pipeline")
