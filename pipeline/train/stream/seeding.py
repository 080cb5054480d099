"""Every random draw of training comes from (seed, ...counters), never from global state: one place for it."""

from __future__ import annotations

import zlib

import numpy as np
import torch


def step_rng(seed: int, *parts: int) -> np.random.Generator:
    """numpy generator for data draws keyed by (seed, purpose, rank, step …)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, *parts])


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """CPU torch generator for one (seed, rank, step): noise and timesteps, the same after a resume."""
    mixed = np.random.SeedSequence([seed & 0xFFFFFFFF, rank, step, 0x5EED]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(mixed))


def stable_id(text: str) -> int:
    """A name as a seed part that is the same in every process and run (unlike ``hash``)."""
    return zlib.crc32(text.encode("utf-8"))
