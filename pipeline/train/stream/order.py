"""The order of a stream's samples, and who reads what: pure functions of integers.

A stream (one task, one source count) is an endless sequence of elements
``g = 0, 1, 2, …``.  :class:`EpochOrder` maps ``g`` to a (shard, sample) pair:
epoch ``g // total``; in each epoch the shards come in a seeded order and are
grouped into blocks of at least ``block_samples`` samples (many shards each);
inside a block the samples come in a seeded permutation.  So every sample comes
exactly once per epoch, file order is gone, and memory is one block's
permutation (4 bytes a sample), never the whole epoch: a stream of 10⁷ samples
in shards of 1,000 holds a 32,768-entry permutation (128 KiB) and the epoch's
shard order (10⁴ entries).

:class:`Cursor` says which elements a partition (rank × DataLoader worker) takes:
``base + part + k·parts`` for k = 0, 1, …, skipping elements that earlier layouts
(a run resumed on another number of ranks or workers) already consumed.  Its
state is a few integers per layout, and :func:`merge_cursors` turns the cursors
of one layout into those of another with every element taken exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.train.stream.seeding import BLOCK_ORDER, SHARD_ORDER

BLOCK_SAMPLES = 32768


class EpochOrder:
    """Element ``g`` → (shard index, sample index), computed; see the module docstring."""

    def __init__(self, counts: list[int], seed: int, salt: tuple[int, ...], block_samples: int = BLOCK_SAMPLES):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.seed, self.salt, self.block_samples = seed, tuple(salt), max(1, block_samples)
        self._layout_cache: tuple[int, Any] | None = None
        self._blocks: dict[tuple[int, int], np.ndarray] = {}

    def _layout(self, epoch: int):
        """The epoch's shard order, cumulative counts in that order, and block start offsets."""
        if self._layout_cache is None or self._layout_cache[0] != epoch:
            rng = SHARD_ORDER.rng(self.seed, *self.salt, epoch)
            perm = rng.permutation(len(self.counts))
            cum = np.cumsum(self.counts[perm])
            starts, running = [0], 0
            for c in self.counts[perm]:
                running += int(c)
                if running - starts[-1] >= self.block_samples:
                    starts.append(running)
            if starts[-1] == self.total and len(starts) > 1:
                starts.pop()
            self._layout_cache = (epoch, (perm, cum, np.asarray(starts, dtype=np.int64)))
            self._blocks.clear()
        return self._layout_cache[1]

    def _block(self, epoch: int, b: int, size: int) -> np.ndarray:
        key = (epoch, b)
        if key not in self._blocks:
            if len(self._blocks) >= 2:  # the partitions of a worker move through one block at a time
                self._blocks.pop(next(iter(self._blocks)))
            rng = BLOCK_ORDER.rng(self.seed, *self.salt, epoch, b)
            self._blocks[key] = rng.permutation(size).astype(np.int32)
        return self._blocks[key]

    def locate(self, g: int) -> tuple[int, int]:
        epoch, q = divmod(g, self.total)
        perm, cum, starts = self._layout(epoch)
        b = int(np.searchsorted(starts, q, side="right")) - 1
        start = int(starts[b])
        end = int(starts[b + 1]) if b + 1 < len(starts) else self.total
        pos = start + int(self._block(epoch, b, end - start)[q - start])
        j = int(np.searchsorted(cum, pos, side="right"))
        before = int(cum[j - 1]) if j else 0
        return int(perm[j]), pos - before


@dataclass
class Layout:
    """The elements one earlier (ranks × workers) layout consumed: ``base + p + k·parts`` for k < taken[p]."""

    base: int
    parts: int
    taken: list[int]

    def consumed(self, g: int) -> bool:
        if g < self.base:
            return False
        k, p = divmod(g - self.base, self.parts)
        return k < self.taken[p]

    def horizon(self) -> int:
        """One past the last element this layout consumed."""
        return max((self.base + p + (k - 1) * self.parts + 1 for p, k in enumerate(self.taken) if k), default=0)

    def first_free(self) -> int:
        """The first element this layout had not consumed (everything before it was)."""
        return min(self.base + p + k * self.parts for p, k in enumerate(self.taken))


@dataclass
class Cursor:
    """Which elements partition ``part`` of ``parts`` takes next."""

    part: int
    parts: int
    base: int = 0
    k: int = 0
    earlier: list[Layout] = field(default_factory=list)

    def next(self) -> int:
        while True:
            g = self.base + self.part + self.k * self.parts
            self.k += 1
            if not any(layout.consumed(g) for layout in self.earlier):
                return g

    def peek(self, count: int) -> list[int]:
        """The next ``count`` elements, without moving (for read-ahead)."""
        saved = self.k
        out = [self.next() for _ in range(count)]
        self.k = saved
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "parts": self.parts,
            "base": self.base,
            "k": self.k,
            "earlier": [[e.base, e.parts, list(e.taken)] for e in self.earlier],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Cursor:
        earlier = [Layout(b, p, list(t)) for b, p, t in state.get("earlier", [])]
        return cls(state["part"], state["parts"], state["base"], state["k"], earlier)


def merge_cursors(old: list[Cursor], parts: int) -> list[Cursor]:
    """Cursors of ``parts`` new partitions that take every element the ``old`` ones (all partitions of one
    layout) had not, exactly once.

    Everything before the slowest old partition's next element was consumed, so the new
    layout starts there; what faster partitions consumed beyond it is remembered as an
    earlier layout and skipped, until all new partitions have passed it.
    """
    if not old or len({c.parts for c in old}) != 1 or sorted(c.part for c in old) != list(range(old[0].parts)):
        raise ValueError("merge_cursors needs the cursors of every partition of one layout")
    old = sorted(old, key=lambda c: c.part)
    current = Layout(old[0].base, old[0].parts, [c.k for c in old])
    base = current.first_free()
    earlier = [e for e in [*old[0].earlier, current] if e.horizon() > base]
    return [Cursor(p, parts, base, 0, [Layout(e.base, e.parts, list(e.taken)) for e in earlier]) for p in range(parts)]
