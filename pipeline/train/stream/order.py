"""The order of a stream's samples, and who reads what: pure functions of integers, and the two order stages.

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

The order stages a stream's source takes its elements from: :class:`IndexedOrder`
(indexed shards: element ids through a cursor) and :class:`StreamedOrder` (shards
that can only be read front to back, ``pipe:`` or without an index: shards in a
seeded order per epoch, every ``parts``-th item owned). Neither knows tar files or
images; both are tested on plain integers (tests/unit/test_stream_order.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.shards.reader import CorruptSample
from pipeline.train.stream.errors import NoUsableSample
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


class IndexedOrder:
    """The elements partition ``part`` of ``parts`` takes, in order; ``locate(g)`` is the (shard, sample) of ``g``."""

    def __init__(self, counts: list[int], seed: int, salt: tuple[int, ...], part: int, parts: int):
        self.order = EpochOrder(counts, seed, salt)
        self.total = self.order.total
        self.part, self.parts = part, parts
        self.cursor = Cursor(part, parts)

    def next(self) -> int:
        return self.cursor.next()

    def peek(self, count: int) -> list[int]:
        """The next ``count`` elements, without moving (what read-ahead fetches)."""
        return self.cursor.peek(count)

    def locate(self, g: int) -> tuple[int, int]:
        return self.order.locate(g)

    def start_epoch(self, epoch: int) -> None:
        self.cursor = Cursor(self.part, self.parts, base=epoch * self.total)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = Cursor.from_state(state["cursor"])

    @staticmethod
    def untouched_state(state: dict[str, Any], part: int) -> dict[str, Any]:
        """The state of partition ``part`` of ``state``'s layout had it consumed nothing (it never read the
        stream): the same base and earlier layouts, no element taken."""
        return {"cursor": {**state["cursor"], "part": part, "k": 0}}

    def merge(self, olds: list[dict[str, Any]]) -> None:
        """Take over the positions of every partition of another layout (each element exactly once)."""
        self.cursor = merge_cursors([Cursor.from_state(o["cursor"]) for o in olds], self.parts)[self.part]


class StreamedOrder:
    """Shards read front to back, in a seeded order per epoch; sample ordinal ``o`` of the pass is partition
    ``o % parts``'s.  ``read_shard(i)`` (the reader, a lower stage) yields shard ``i``'s items in file order.

    Yields ``([shard, sample, epoch], item)`` for each owned item, a :class:`CorruptSample` included: the
    stream's error handler decides what it costs.  A whole pass in which no item (owned or not) is usable
    raises :class:`NoUsableSample` instead of looping for ever."""

    def __init__(
        self,
        num_shards: int,
        seed: int,
        salt: tuple[int, ...],
        part: int,
        parts: int,
        read_shard: Callable[[int], Iterator[Any]],
    ):
        self.num_shards, self.seed, self.salt = num_shards, seed, tuple(salt)
        self.part, self.parts = part, parts
        self.read_shard = read_shard
        self.seq = {"epoch": 0, "pos": 0, "sample": 0, "ordinal": 0}
        self._iter: Iterator[tuple[list[int], Any]] | None = None
        self._perm: tuple[int, np.ndarray] | None = None

    def shard_order(self, epoch: int) -> np.ndarray:
        """Shard order of ``epoch`` (the same for every partition)."""
        if self._perm is None or self._perm[0] != epoch:
            rng = SHARD_ORDER.rng(self.seed, *self.salt, epoch)
            self._perm = (epoch, rng.permutation(self.num_shards))
        return self._perm[1]

    def next(self) -> tuple[list[int], Any]:
        if self._iter is None:
            self._iter = self._walk()
        return next(self._iter)

    def _walk(self) -> Iterator[tuple[list[int], Any]]:
        st = self.seq
        while True:
            perm = self.shard_order(st["epoch"])
            whole_pass, usable = st["pos"] == 0 and st["sample"] == 0, 0
            while st["pos"] < len(perm):
                index, skip = int(perm[st["pos"]]), st["sample"]
                for i, item in enumerate(self.read_shard(index)):
                    if i < skip:
                        continue
                    st["sample"] = i + 1
                    owned = st["ordinal"] % self.parts == self.part
                    st["ordinal"] += 1
                    usable += not isinstance(item, CorruptSample)
                    if owned:
                        yield [index, i, st["epoch"]], item
                st["pos"] += 1
                st["sample"] = 0
            if whole_pass and not usable:  # nothing in a whole pass can be used: an error, not an endless loop
                raise NoUsableSample(f"no usable sample in a whole pass over {len(perm)} shard(s)")
            st["epoch"] += 1
            st["pos"] = 0

    def start_epoch(self, epoch: int) -> None:
        self.seq = {"epoch": epoch, "pos": 0, "sample": 0, "ordinal": 0}
        self._iter = None

    def state_dict(self) -> dict[str, Any]:
        return {"seq": dict(self.seq)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seq = dict(state["seq"])
        self._iter = None

    def reread(self, refs: list) -> dict[tuple[int, ...], Any]:
        """The items at ``refs`` ([shard, sample, epoch]) again: one pass per shard, up to the last one wanted."""
        wanted: dict[int, dict[int, tuple[int, ...]]] = {}
        for ref in refs:
            wanted.setdefault(ref[0], {})[ref[1]] = ref_key(ref)
        out = {}
        for shard, samples in wanted.items():
            for i, item in enumerate(self.read_shard(shard)):
                if i in samples and not isinstance(item, CorruptSample):
                    out[samples[i]] = item
                if i >= max(samples):
                    break
        return out


def ref_key(ref: Any) -> Any:
    """A sample reference as a dict key (a streamed reference is a [shard, sample, epoch] list in JSON)."""
    return tuple(ref) if isinstance(ref, list) else ref
