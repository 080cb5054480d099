"""Every random draw of the data stream comes from (seed, ...counters), never from global state: one place for them.

The training step's own draws (noise, timesteps) come from ``pipeline.train.engine.step.step_generator``."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

SEED_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class Purpose:
    """One kind of random draw of the data stream: its number is part of every seed it makes, so no two purposes
    ever share a stream of numbers. The number goes first or ``last`` as each draw was first written (moving it
    would change the sample order of every run)."""

    name: str
    number: int | None  # None: the keys alone (the shuffle buffer's draws, keyed by its partition)
    last: bool = False

    def rng(self, seed: int, *keys: int) -> np.random.Generator:
        """The numpy generator of this purpose for (seed, keys…): e.g. (seed, step) or (seed, rank, step)."""
        number = [] if self.number is None else [self.number]
        parts = [*keys, *number] if self.last else [*number, *keys]
        return np.random.default_rng([seed & SEED_MASK, *parts])


# every random draw of the stream, by purpose
SOURCE_COUNT = Purpose("the number of source images of a step (every rank the same)", 1)
TASK = Purpose("the task of a rank's step", 2)
SHARD_ORDER = Purpose("the shard order of an epoch of a stream", 3, last=True)
CROP = Purpose("the crop offsets of an element", 4)
BLOCK_ORDER = Purpose("the sample order inside a block of an epoch", 5, last=True)
SHUFFLE_BUFFER = Purpose("the sample a streamed shard's shuffle buffer gives next", None)
VARIANT = Purpose("the embedding variant (language, dropped text, inverse) of an element", 7, last=True)


def stable_id(text: str) -> int:
    """A name as a seed part that is the same in every process and run (unlike ``hash``)."""
    return zlib.crc32(text.encode("utf-8"))
