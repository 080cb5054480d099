"""Where samples wait: aspect-bucket pools until a batch of one bucket can be made, and a streamed source's shuffle
buffer; both bounded by the worker's byte budget.

A batch takes the mean aspect per image position for its crop, so samples of
*similar* shape are enough.  When the pools of a stream would pass
``max_samples`` (or the worker's shared byte budget is spent), the batch is made
from the largest group of samples sharing a target bucket, and failing that from
the oldest samples whatever their bucket.  So the first batch arrives
within ``max_samples`` reads however the buckets are spread, and memory stays
bounded.  Items are opaque (a reference and a sample); the pools only see a
bucket tuple (target last) and a size in bytes, so they are tested on integers.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from pipeline.train.stream.order import ref_key


class ByteBudget:
    """Bytes held by all pools and buffers of one DataLoader worker (shared by its streams)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def spent(self) -> bool:
        return self.used > self.limit


class BucketPools:
    def __init__(self, batch_size: int, max_samples: int, budget: ByteBudget | None = None):
        self.batch_size = batch_size
        self.max_samples = max(batch_size, max_samples)
        self.budget = budget or ByteBudget(1 << 62)
        self.pools: dict[tuple, list[tuple[int, Any, int]]] = {}  # bucket -> [(arrival, item, bytes)]
        self.arrivals = 0
        self.fallbacks = 0  # batches made across buckets because of the bound

    def __len__(self) -> int:
        return sum(len(p) for p in self.pools.values())

    def add(self, bucket: tuple[Hashable, ...], item: Any, size: int = 0) -> list[Any] | None:
        """Add one item; return a batch when one is ready."""
        bucket = tuple(bucket)
        pool = self.pools.setdefault(bucket, [])
        pool.append((self.arrivals, item, size))
        self.arrivals += 1
        self.budget.used += size
        if len(pool) >= self.batch_size:
            return self._take([(bucket, i) for i in range(self.batch_size)])
        if len(self) > self.max_samples or (self.budget.spent() and len(self) >= self.batch_size):
            self.fallbacks += 1
            by_target: dict[tuple, list[tuple[tuple, int]]] = {}
            for b, p in self.pools.items():
                by_target.setdefault(b[-1:], []).extend((b, i) for i in range(len(p)))
            largest = max(by_target.values(), key=len)
            chosen = largest if len(largest) >= self.batch_size else self._all()
            chosen.sort(key=lambda bi: self.pools[bi[0]][bi[1]][0])  # oldest first
            return self._take(chosen[: self.batch_size])
        return None

    def _all(self) -> list[tuple[tuple, int]]:
        return [(b, i) for b, p in self.pools.items() for i in range(len(p))]

    def _take(self, chosen: list[tuple[tuple, int]]) -> list[Any]:
        by_bucket: dict[tuple, set[int]] = {}
        for b, i in chosen:
            by_bucket.setdefault(b, set()).add(i)
        out = []
        for b, p in self.pools.items():  # stable: pool order, then arrival
            for i in sorted(by_bucket.get(b, ())):
                out.append(p[i])
        for b, indices in by_bucket.items():
            kept = [e for i, e in enumerate(self.pools[b]) if i not in indices]
            if kept:
                self.pools[b] = kept
            else:
                del self.pools[b]
        out.sort(key=lambda e: e[0])
        self.budget.used -= sum(e[2] for e in out)
        return [e[1] for e in out]

    def hold(self, bucket: tuple[Hashable, ...], item: Any, size: int = 0) -> None:
        """Add without making a batch (samples read while looking for a replacement, or handed over on resume)."""
        self.pools.setdefault(tuple(bucket), []).append((self.arrivals, item, size))
        self.arrivals += 1
        self.budget.used += size

    def pop_from(self, bucket: tuple) -> Any | None:
        """One waiting item of ``bucket`` (a replacement for a sample that turned out unreadable), or None."""
        pool = self.pools.get(tuple(bucket))
        if not pool:
            return None
        _, item, size = pool.pop(0)
        if not pool:
            del self.pools[tuple(bucket)]
        self.budget.used -= size
        return item

    def state_dict(self, ref_of) -> dict[str, Any]:
        """JSON-able: buckets and item references (``ref_of(item)``) with their arrival numbers."""
        return {
            "arrivals": self.arrivals,
            "fallbacks": self.fallbacks,
            "pools": [[list(b), [[a, ref_of(item)] for a, item, _ in p]] for b, p in self.pools.items()],
        }

    @staticmethod
    def empty_state() -> dict[str, Any]:
        """The saved state of pools that hold nothing (a partition that never read the stream)."""
        return {"arrivals": 0, "fallbacks": 0, "pools": []}

    @staticmethod
    def refs_in(state: dict[str, Any]) -> list[Any]:
        """The references of the items a saved state holds, in pool order (what a restore reads again)."""
        return [ref for _, entries in state["pools"] for _, ref in entries]

    def load_state_dict(self, state: dict[str, Any], item_of) -> None:
        """``item_of(ref)`` → (item, size in bytes): the items are fetched again."""
        self.clear()
        self.arrivals, self.fallbacks = state["arrivals"], state.get("fallbacks", 0)
        for bucket, entries in state["pools"]:
            pool = self.pools.setdefault(tuple(bucket), [])
            for arrival, ref in entries:
                item, size = item_of(ref)
                pool.append((arrival, item, size))
                self.budget.used += size

    def refs(self, ref_of) -> list[Any]:
        return [ref_of(item) for p in self.pools.values() for _, item, _ in p]

    def clear(self) -> None:
        self.budget.used -= sum(e[2] for p in self.pools.values() for e in p)
        self.pools.clear()


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
