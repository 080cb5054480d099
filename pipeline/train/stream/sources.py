"""Order: which elements a partition takes, and in what order — one stage each, each with its own small state.

* :class:`IndexedOrder` — indexed shards in the computed sample-level order
  (:class:`~pipeline.train.stream.order.EpochOrder`), taken through a
  :class:`~pipeline.train.stream.order.Cursor`: it gives element ids, and the read
  stage (``read.py``) and read-ahead (``readahead.py``) turn them into samples.
* :class:`StreamedSource` — shards that can only be read front to back (``pipe:``,
  no index): shards in a seeded order per epoch, every ``parts``-th sample owned.
* :class:`ShuffleBuffer` — mixes a streamed source (an indexed order is already
  shuffled), bounded in samples and by the worker's byte budget.

None of them knows about tar files or images, nor calls back into the stream that
composes them; each is tested on plain integers (tests/{unit,integration}/test_stream_order.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pipeline.shards.reader import CorruptSample
from pipeline.train.stream.errors import NoUsableSample
from pipeline.train.stream.order import Cursor, EpochOrder, merge_cursors
from pipeline.train.stream.pools import ByteBudget
from pipeline.train.stream.seeding import SHARD_ORDER


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

    def merge(self, olds: list[dict[str, Any]]) -> None:
        """Take over the positions of every partition of another layout (each element exactly once)."""
        self.cursor = merge_cursors([Cursor.from_state(o["cursor"]) for o in olds], self.parts)[self.part]


class StreamedSource:
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
