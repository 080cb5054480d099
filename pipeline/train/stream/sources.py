"""A partition's source of samples: two strategies behind one interface, chosen once per stream.

* :class:`IndexedSource` — indexed shards: element ids in the computed order
  (``order.IndexedOrder``), read by range (``read.py``) with reads in flight ahead
  (``readahead.py``). Its state is a cursor; it takes over any other layout.
* :class:`StreamedSource` — shards read front to back (``pipe:``, no index): the
  items a partition owns (``order.StreamedOrder``), their draws decided, mixed by a
  shuffle buffer (``pools.ShuffleBuffer``). Its state is the pass position, the
  buffer's generator and the references of what waits; it resumes only on the same
  ranks × workers.

Both offer the same five things to the stream that composes them: the next usable
sample (:meth:`Source.next`: every failure goes to the worker's error handler), the
samples at saved references again (``reread``), their state (``state_dict``,
``load_state_dict``), which references a saved state holds (``waiting``) and the
take-over of another layout's states (``merge``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from pipeline.shards.reader import CorruptSample, IndexCache, RangeReader, RawSample, stream_shard
from pipeline.shards.tasks import DataConfigError, Shard
from pipeline.train.config.data import StreamConfig
from pipeline.train.stream.decide import decide
from pipeline.train.stream.errors import ITEM, READ, ErrorHandler, UnusableData
from pipeline.train.stream.order import IndexedOrder, StreamedOrder, ref_key
from pipeline.train.stream.pools import ByteBudget, ShuffleBuffer
from pipeline.train.stream.read import IndexedReads
from pipeline.train.stream.readahead import Prefetch, ReadAhead
from pipeline.train.stream.seeding import SHUFFLE_BUFFER, stable_id


@dataclass
class WorkerReads:
    """What every stream of one DataLoader worker shares: the reader and its index cache, the one error handler,
    the byte budget of pools and buffers, the read-ahead threads."""

    reader: RangeReader
    index_cache: IndexCache
    handler: ErrorHandler
    budget: ByteBudget
    readahead: ReadAhead | None = None


class Source:
    """What a partition stream asks of its source (see the module docstring); ``indexed`` is saved in the state,
    so a checkpoint of the other kind of source is recognised."""

    indexed: bool

    def __init__(self, task: str, n: int, config: StreamConfig, handler: ErrorHandler, key: str):
        self.task, self.n, self.config, self.handler, self.key = task, n, config, handler, key

    def next(self) -> tuple[Any, RawSample]:
        """The next sample of this partition that can be read, with its draws."""
        return self.next_usable()

    def next_usable(self) -> tuple[Any, RawSample]:
        """The next owned sample that reads; every failure to the handler, which skips it or stops the run."""
        while True:
            try:
                ref, sample = self.take()
                if isinstance(sample, CorruptSample):
                    self.handler.handle(self.key, ITEM, sample.reason)
                    continue
            except Exception as exc:  # noqa: BLE001 - the handler decides: skip it, or stop with a message
                self.handler.handle(self.key, READ, exc)
                continue
            self.handler.passed(self.key, READ)
            return ref, sample

    def take(self) -> tuple[Any, RawSample | CorruptSample]:
        raise NotImplementedError

    def wrote(self, state: dict[str, Any]) -> bool:
        """Whether a saved stream state is of this kind of source (a checkpoint of the other kind starts over)."""
        return state.get("indexed") == self.indexed

    def waiting(self, state: dict[str, Any]) -> list[Any]:
        """The references a saved state of this source holds (read again on restore)."""
        return []

    def check_takeover(self) -> None:
        """Refuse (:class:`DataConfigError`) when this source cannot take over another layout's states."""

    def merge(self, olds: list[dict[str, Any]], waiting: list) -> list:
        """Take over the states of every partition of another layout; returns which of the ``waiting`` references
        (the old partitions' pooled samples) this partition holds from now on."""
        raise NotImplementedError

    def drop(self) -> None:
        """Forget reads in flight (before a restore moves the position)."""


class IndexedSource(Source):
    indexed = True

    def __init__(self, task: str, n: int, shards: list[Shard], part: int, parts: int, config: StreamConfig,
                 worker: WorkerReads, key: str):  # fmt: skip
        super().__init__(task, n, config, worker.handler, key)
        self.total = sum(s.samples for s in shards)
        if self.total == 0:
            raise DataConfigError(f"task {task}: the shards with {n} source(s) hold no samples")
        self.part, self.parts = part, parts
        self.order = IndexedOrder([s.samples for s in shards], config.seed, key_salt(task, n), part, parts)
        self.reads = IndexedReads(task, n, shards, self.order, worker.reader, worker.index_cache, config)
        self.ahead = Prefetch(worker.readahead, self.reads.read, self.reads.size_of, max(4, 2 * config.batch_size))

    def take(self) -> tuple[int, RawSample]:
        ref = self.order.next()
        try:
            return ref, self.ahead.take(ref)
        finally:
            self.ahead.plan(self.order.peek(self.ahead.depth))

    def reread(self, refs: list[int]) -> dict[int, RawSample]:
        """One range read each."""
        return {ref: self.reads.read(ref) for ref in refs}

    def drop(self) -> None:
        self.ahead.drop()

    def start_epoch(self, epoch: int) -> None:
        self.order.start_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any], samples: dict) -> None:
        self.order.load_state_dict(state)

    def merge(self, olds: list[dict[str, Any]], waiting: list[int]) -> list[int]:
        """Take over every partition of another layout: the cursors merge, each element exactly once; of the
        elements that waited in the old partitions, this partition's (``g % parts``), in order."""
        self.order.merge(olds)
        return sorted(ref for ref in waiting if ref % self.parts == self.part)


def streamed_layout_refusal(task: str, n: int) -> DataConfigError:
    return DataConfigError(
        f"task {task} N={n}: streamed shards (pipe: or without an index) resume only on the same ranks × "
        "DataLoader workers; index them (shards_tools) or resume with the same layout"
    )


class StreamedSource(Source):
    indexed = False
    total = None  # unknown until read

    def __init__(self, task: str, n: int, shards: list[Shard], part: int, parts: int, config: StreamConfig,
                 worker: WorkerReads, key: str, size_of):  # fmt: skip
        super().__init__(task, n, config, worker.handler, key)
        salt = key_salt(task, n)
        urls = [s.url for s in shards]
        read_shard = partial(read_streamed, urls, config.storage_options, worker.reader.policy)
        self.order = StreamedOrder(len(shards), config.seed, salt, part, parts, read_shard=read_shard)
        size = max(0, config.shuffle_buffer)
        self.buffer = ShuffleBuffer(size, SHUFFLE_BUFFER.rng(config.seed, *salt, part), worker.budget, size_of)

    def next(self) -> tuple[Any, RawSample]:
        return self.buffer.next(self.next_usable)

    def take(self) -> tuple[list[int], RawSample | CorruptSample]:
        ref, sample = self.order.next()
        if not isinstance(sample, CorruptSample):
            sample.choice = decide(sample.meta, self.config, self.task, self.n, tuple(ref))
        return ref, sample

    def reread(self, refs: list) -> dict[Any, RawSample]:
        """One pass per shard, up to the last reference wanted in it."""
        out = self.order.reread(refs)
        missing = [r for r in refs if ref_key(r) not in out]
        if missing:
            raise UnusableData(
                f"task {self.task} N={self.n}: the samples that waited at the checkpoint cannot be read again "
                f"({missing[:3]}...): a shard changed in place; check it with python -m shards_tools verify"
            )
        for ref, sample in out.items():
            sample.choice = decide(sample.meta, self.config, self.task, self.n, ref)
        return out

    def waiting(self, state: dict[str, Any]) -> list[Any]:
        return list(state.get("buffer", []))

    def start_epoch(self, epoch: int) -> None:
        self.order.start_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {**self.order.state_dict(), **self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any], samples: dict) -> None:
        self.order.load_state_dict(state)
        self.buffer.load_state_dict(state, samples)

    def check_takeover(self) -> None:
        raise streamed_layout_refusal(self.task, self.n)

    def merge(self, olds: list[dict[str, Any]], waiting: list) -> list:
        raise streamed_layout_refusal(self.task, self.n)


def key_salt(task: str, n: int) -> tuple[int, int]:
    """A stream's part of every seed of its order: the same in every process and run."""
    return (stable_id(task), n)


def read_streamed(urls: list[str], storage_options: dict | None, policy, index: int):
    """Shard ``index`` of ``urls`` front to back (the reader stage the streamed order is given)."""
    return stream_shard(urls[index], storage_options, policy)


def open_source(task: str, n: int, shards: list[Shard], part: int, parts: int, config: StreamConfig,
                worker: WorkerReads, key: str, size_of) -> Source:  # fmt: skip
    """The strategy for ``shards``: indexed when every shard has an index and a sample count, else streamed."""
    if all(s.index_url and s.samples is not None for s in shards):
        return IndexedSource(task, n, shards, part, parts, config, worker, key)
    return StreamedSource(task, n, shards, part, parts, config, worker, key, size_of)
