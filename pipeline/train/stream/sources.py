"""Where a partition's samples come from, one stage each, each with its own small state.

* :class:`IndexedSource` — indexed shards in the computed sample-level order
  (:class:`~pipeline.train.stream.order.EpochOrder`), taken through a
  :class:`~pipeline.train.stream.order.Cursor`; the next elements are read ahead.
* :class:`StreamedSource` — shards that can only be read front to back (``pipe:``,
  no index): shards in a seeded order per epoch, every ``parts``-th sample owned.
* :class:`ShuffleBuffer` — mixes a streamed source (an indexed order is already
  shuffled), bounded in samples and by the worker's byte budget.

None of them knows about tar files or images: reading is a function passed in,
so each is tested on plain integers (tests/{unit,integration}/test_stream_order.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np

from pipeline.train.stream.errors import NoUsableSample
from pipeline.train.stream.order import Cursor, EpochOrder, merge_cursors
from pipeline.train.stream.pools import ByteBudget
from pipeline.train.stream.readahead import ReadAhead
from pipeline.train.stream.seeding import SHARD_ORDER


class IndexedSource:
    """Element ``g`` → ``load(g, shard, sample)``; the cursor says which elements are this partition's.

    ``size_of(shard, sample)`` is the bytes a read brings (for the read-ahead budget); the
    next ``depth`` elements are kept in flight when a :class:`ReadAhead` is given.
    """

    def __init__(
        self,
        counts: list[int],
        seed: int,
        salt: tuple[int, ...],
        part: int,
        parts: int,
        load: Callable[[int, int, int], Any],
        size_of: Callable[[int, int], int] | None = None,
        readahead: ReadAhead | None = None,
        depth: int = 4,
    ):
        self.order = EpochOrder(counts, seed, salt)
        self.total = self.order.total
        self.part, self.parts = part, parts
        self.cursor = Cursor(part, parts)
        self.load, self.size_of = load, size_of
        self.readahead, self.depth = readahead, depth
        self.ahead: dict[int, tuple[Future, int]] = {}  # element -> (read in flight, bytes reserved)

    def next(self) -> tuple[int, Any]:
        g = self.cursor.next()
        return g, self.read(g)

    def read(self, g: int) -> Any:
        """Element ``g``: from the read-ahead when it is in flight, else read now; then top the read-ahead up."""
        pending = self.ahead.pop(g, None)
        try:
            if pending is not None:
                future, size = pending
                try:
                    return future.result()
                finally:
                    self.readahead.release(size)
            return self.load(g, *self.order.locate(g))
        finally:
            self._top_up()

    def _top_up(self) -> None:
        if self.readahead is None or not self.readahead.enabled:
            return
        for g in self.cursor.peek(self.depth):
            if g in self.ahead:
                continue
            shard, sample = self.order.locate(g)
            try:
                size = self.size_of(shard, sample) if self.size_of else 0
            except Exception:  # noqa: BLE001 - the element's own read will report it
                return
            future = self.readahead.try_submit(size, lambda g=g, s=shard, i=sample: self.load(g, s, i))
            if future is None:
                return
            self.ahead[g] = (future, size)

    def drop_readahead(self) -> None:
        """Forget reads in flight (their elements are read again when taken)."""
        for future, size in self.ahead.values():
            future.cancel()
            self.readahead.release(size)
        self.ahead.clear()

    def start_epoch(self, epoch: int) -> None:
        self.drop_readahead()
        self.cursor = Cursor(self.part, self.parts, base=epoch * self.total)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drop_readahead()
        self.cursor = Cursor.from_state(state["cursor"])

    def merge(self, olds: list[dict[str, Any]]) -> None:
        """Take over the positions of every partition of another layout (each element exactly once)."""
        self.drop_readahead()
        self.cursor = merge_cursors([Cursor.from_state(o["cursor"]) for o in olds], self.parts)[self.part]


class StreamedSource:
    """Shards read front to back, in a seeded order per epoch; sample ordinal ``o`` of the pass is partition
    ``o % parts``'s.  ``read_shard(i)`` yields shard ``i``'s items in file order; ``bad(item)`` is a reason to
    skip it (or None), reported through ``on_skip``."""

    def __init__(
        self,
        num_shards: int,
        seed: int,
        salt: tuple[int, ...],
        part: int,
        parts: int,
        read_shard: Callable[[int], Iterator[Any]],
        bad: Callable[[Any], str | None] = lambda item: None,
        on_skip: Callable[[str], None] = lambda reason: None,
    ):
        self.num_shards, self.seed, self.salt = num_shards, seed, tuple(salt)
        self.part, self.parts = part, parts
        self.read_shard, self.bad, self.on_skip = read_shard, bad, on_skip
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
                    reason = self.bad(item)
                    if reason is not None:
                        if owned:
                            self.on_skip(reason)
                        continue
                    usable += 1
                    if owned:
                        yield [index, i], item
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

    def reread(self, refs: list) -> dict[tuple[int, int], Any]:
        """The items at ``refs`` ([shard, sample]) again: one pass per shard, stopping at the last one wanted."""
        wanted: dict[int, set[int]] = {}
        for shard, sample in refs:
            wanted.setdefault(shard, set()).add(sample)
        out = {}
        for shard, samples in wanted.items():
            for i, item in enumerate(self.read_shard(shard)):
                if i in samples and self.bad(item) is None:
                    out[(shard, i)] = item
                if i >= max(samples):
                    break
        return out


class ShuffleBuffer:
    """Up to ``size`` items, one drawn at random per take and replaced by the next from the source.

    Bounded by the worker's :class:`ByteBudget` too: when it is spent the buffer shrinks
    instead of refilling.  State: the generator and the references of what waits.
    """

    def __init__(self, size: int, rng: np.random.Generator, budget: ByteBudget, size_of: Callable[[Any], int]):
        self.size, self.budget, self.size_of = size, budget, size_of
        self.rng = rng
        self.items: list[tuple[Any, Any]] = []

    def next(self, take: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        if self.size <= 1:
            return take()
        while len(self.items) < self.size and not (self.budget.spent() and self.items):
            self._hold(take())
        j = int(self.rng.integers(len(self.items)))
        out = self.items[j]
        self.budget.used -= self.size_of(out[1])
        if self.budget.spent():
            self.items.pop(j)
        else:
            ref, item = take()
            self.items[j] = (ref, item)
            self.budget.used += self.size_of(item)
        return out

    def _hold(self, entry: tuple[Any, Any]) -> None:
        self.items.append(entry)
        self.budget.used += self.size_of(entry[1])

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "buffer": [ref for ref, _ in self.items]}

    def load_state_dict(self, state: dict[str, Any], items: dict) -> None:
        """``items`` maps each saved reference (as a tuple) to its item, read again."""
        self.rng.bit_generator.state = state["rng"]
        self.budget.used -= sum(self.size_of(item) for _, item in self.items)
        self.items = []
        for ref in state.get("buffer", []):
            self._hold((ref, items[ref_key(ref)]))


def ref_key(ref: Any) -> Any:
    return tuple(ref) if isinstance(ref, list) else ref
