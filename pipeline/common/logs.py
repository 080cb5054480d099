"""Logging set-up shared by the CLIs: one format, the rank in every prefix."""

from __future__ import annotations

import logging

from pipeline.common.flags import distributed_env


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger with ``[rank R]`` in the prefix; returns the project logger."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {distributed_env().rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    return logging.getLogger("pipeline")
