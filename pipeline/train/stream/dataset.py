"""The training stream: endless per-(task, N) partitions, weighted mixing, exact JSON state.

What webdataset cannot do and is therefore written here:

* **Deterministic order, endless for everyone.** Each stream (task, N) is one
  infinite sequence: epoch after epoch, shards in a seeded order, samples in
  file order.  Element ``g`` belongs to partition ``g % P`` (P = ranks ×
  workers), so partitions are disjoint within an epoch and every partition gets
  an endless, non-empty stream even from a single shard.
* **A cursor that is a number.** A partition's position is how many of its
  elements it consumed; on indexed shards that maps arithmetically to (shard,
  sample), so resuming is one seek, and the shuffle buffer and bucket pools are
  saved as references and re-read on restore.
* **Mixing.** Step ``s`` draws N from (seed, s) — the same on every rank — then
  a task with data at N from (seed, rank, s).  The DataLoader asks its workers in
  turn from worker 0, so batch ``s`` is made by worker ``(s - base) % W``, where
  ``base`` is the step the loader started at (0, or the step of a resume on
  another layout): a worker knows its steps.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from pipeline.common import images as imaging
from pipeline.errors import DataError
from pipeline.shards.reader import IndexCache, RangeReader, RawSample
from pipeline.shards.tasks import Shard, Task
from pipeline.train.config.data import StreamConfig
from pipeline.train.stream import state as states
from pipeline.train.stream.batching import assemble_batch
from pipeline.train.stream.errors import ASSEMBLE, DATA_ERROR, ErrorHandler, UnusableSample
from pipeline.train.stream.mix import MixPlan, draw_num_sources, draw_task
from pipeline.train.stream.order import IndexedOrder, ref_key
from pipeline.train.stream.pools import BucketPools, ByteBudget
from pipeline.train.stream.readahead import ReadAhead
from pipeline.train.stream.sources import WorkerReads, open_source, streamed_layout_refusal

log = logging.getLogger(__name__)

POOL_BATCHES = 4  # a stream's bucket pools hold at most this many batches' worth of samples


# ---------------------------------------------------------------------------------------------
# one partition of one stream


def shard_digest(shards: list[Shard]) -> str:
    """Identifies a stream's shard list (URLs and sample counts): a resume notices shards added or removed."""
    text = "\n".join(f"{s.url}\t{s.samples}" for s in shards)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def sample_bytes(sample: RawSample) -> int:
    return sum(len(v) for v in sample.images.values()) + sum(len(v) for v in sample.embeddings.values())


# a fresh epoch after the shard list changed: far beyond any epoch a run reaches, distinct per change
GENERATION_EPOCHS = 1 << 32


class PartitionStream:
    """The samples of one (task, N) that partition ``part`` of ``parts`` owns: endless, shuffled, bucketed.

    It composes the stages, each its own unit with its own state, and calls them
    downward only: its *source* (``sources.py``, one of two strategies: indexed shards
    in the computed order, read by range ahead of need; or streamed shards front to
    back through a shuffle buffer) gives samples with their draws decided → *pool* by
    bucket (``pools.py``, where replacements come from). Assembly into tensors is the
    dataset's next stage. Every failure on the way goes to the worker's one
    :class:`ErrorHandler`, which skips and counts or stops the run. Its state is its
    stages' states side by side; each stage restores and merges its own.
    """

    def __init__(self, task: str, num_sources: int, shards: list[Shard], part: int, parts: int,
                 config: StreamConfig, worker: WorkerReads):  # fmt: skip
        self.task, self.n, self.shards, self.config = task, num_sources, shards, config
        self.part, self.parts = part, parts
        self.digest = shard_digest(shards)
        self.budget = worker.budget
        self.key = f"{task}|{num_sources}"
        self.handler = worker.handler
        self.source = open_source(task, num_sources, shards, part, parts, config, worker, self.key, sample_bytes)
        self.total = self.source.total or 0
        self.counts = self.handler.register(self.key, task, num_sources, len(shards), self.source.total)
        self.pools = BucketPools(config.batch_size, POOL_BATCHES * config.batch_size, self.budget)
        self.generation = 0  # how many times the shard list changed under a resumed run

    @property
    def skipped(self) -> int:
        """Samples this stream skipped (saved in the data state)."""
        return self.counts.skipped

    @skipped.setter
    def skipped(self, count: int) -> None:
        self.counts.skipped = count

    # ---- source → pools ----------------------------------------------------------------------
    def _next_item(self) -> tuple[Any, RawSample]:
        """The next usable sample of this partition, with its draws (its source's order, buffer and read-ahead)."""
        return self.source.next()

    # ---- pools -------------------------------------------------------------------------------
    def next_batch(self, batch_size: int) -> list[tuple[Any, RawSample]]:
        """(reference, sample) × ``batch_size``, of one aspect bucket (or similar, when the pools are full)."""
        self.pools.batch_size = batch_size
        while True:
            ref, sample = self._next_item()
            batch = self.pools.add(tuple(sample.meta["bucket"]), (ref, sample), sample_bytes(sample))
            if batch is not None:
                return batch

    def replacement(self, unusable: tuple[Any, RawSample], exc: Exception) -> tuple[Any, RawSample]:
        """Another sample of ``unusable``'s bucket, for one that failed while its batch was assembled (the handler
        counts it, and stops a stream whose samples keep failing)."""
        self.handler.handle(self.key, ASSEMBLE, exc, unusable[1].key)
        bucket = tuple(unusable[1].meta["bucket"])
        waiting = self.pools.pop_from(bucket)
        if waiting is not None:
            return waiting
        for _ in range(self.pools.max_samples):
            ref, sample = self._next_item()
            if tuple(sample.meta["bucket"]) == bucket:
                return ref, sample
            self.pools.hold(tuple(sample.meta["bucket"]), (ref, sample), sample_bytes(sample))
        log.warning("task %s N=%d: no sample of bucket %s nearby; another bucket's instead", self.task, self.n, bucket)
        return self._next_item()

    def assembled(self) -> None:
        """The batch taken last was assembled: the handler's run of assembly failures ends."""
        self.handler.passed(self.key, ASSEMBLE)

    # ---- state: each stage its own, composed here -------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "indexed": self.source.indexed,
            "generation": self.generation,
            "skipped": self.skipped,
            "pools": self.pools.state_dict(lambda item: item[0]),
            **self.source.state_dict(),
        }

    @staticmethod
    def untouched_state(state: dict[str, Any], part: int) -> dict[str, Any]:
        """The state of partition ``part`` of ``state``'s (indexed) layout had it never read this stream."""
        return {
            **state,
            **IndexedOrder.untouched_state(state, part),
            "pools": BucketPools.empty_state(),
            "skipped": 0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This partition's own state of the same layout (bitwise exact); the samples that waited read again."""
        self.source.drop()
        self.skipped = state.get("skipped", 0)
        if state.get("digest") != self.digest or not self.source.wrote(state):
            self.start_new_epoch(state)
            return
        self.generation = state["generation"]
        samples = self.source.reread([*self.source.waiting(state), *BucketPools.refs_in(state["pools"])])
        self.source.load_state_dict(state, samples)
        self.pools.load_state_dict(
            state["pools"], lambda ref: ((ref, samples[ref_key(ref)]), sample_bytes(samples[ref_key(ref)]))
        )

    def start_new_epoch(self, state: dict[str, Any]) -> None:
        """The shard list changed since the checkpoint: its positions mean nothing now; start a fresh epoch."""
        self.generation = state.get("generation", 0) + 1
        log.warning(
            "task %s N=%d: the shards changed since the checkpoint (%d shard(s), %d sample(s) now); "
            "its position and waiting samples are dropped and a new epoch starts",
            self.task,
            self.n,
            len(self.shards),
            self.total,
        )
        self.source.drop()
        self.source.start_epoch(self.generation * GENERATION_EPOCHS)

    def load_elastic(self, olds: list[dict[str, Any]]) -> int:
        """Take over from every partition of another (ranks × workers) layout; returns the samples re-read.

        The source merges the positions (each element exactly once); the samples that waited in the old
        pools go to the partition that owns them now and wait again here.
        """
        if not all(o.get("indexed") for o in olds):
            raise streamed_layout_refusal(self.task, self.n)
        self.source.drop()
        if any(o.get("digest") != self.digest for o in olds):
            self.source.check_takeover()
            self.start_new_epoch(olds[0])
            return 0
        self.skipped = sum(o.get("skipped", 0) for o in olds)
        self.generation = olds[0]["generation"]
        mine = self.source.merge(olds, [ref for o in olds for ref in BucketPools.refs_in(o["pools"])])
        samples = self.source.reread(mine)
        for ref in mine:
            sample = samples[ref]
            self.pools.hold(tuple(sample.meta["bucket"]), (ref, sample), sample_bytes(sample))
        return len(mine)


# ---------------------------------------------------------------------------------------------
# the dataset the DataLoader iterates


class MixedBatchDataset(IterableDataset):
    """Endless batches for one rank; each DataLoader worker makes the steps ``s ≡ worker (mod W)``.

    Implements ``state_dict``/``load_state_dict`` (torchdata's Stateful protocol) with
    JSON-able state, so ``StatefulDataLoader`` checkpoints it per worker.  A checkpoint of
    another ranks × workers layout is taken over with :meth:`set_elastic` instead.
    """

    def __init__(self, tasks: dict[str, Task], plan: MixPlan, rank: int, world_size: int, config: StreamConfig):
        self.tasks, self.plan, self.rank, self.world_size, self.config = tasks, plan, rank, world_size, config
        imaging.preload_decoders()  # in the parent: forked workers do not each import them again
        self.made = 0  # batches this worker made
        self.base = 0  # the loader's first step: 0, or the step a resume on another layout started at
        self._ready = False
        self._loaded: dict[str, Any] | None = None
        self._elastic: dict[str, Any] | None = None
        self._streams: dict[str, PartitionStream] = {}
        self._workers = 1
        self._worker = 0

    def _setup_worker(self) -> None:
        info = get_worker_info()
        self._worker, self._workers = (info.id, info.num_workers) if info else (0, 1)
        self._streams = {}
        self.handler = ErrorHandler(self.config.max_bad_in_a_row)  # every stage's failures, the reader's included
        self.reader = RangeReader(self.config.storage_options, policy=self.handler)
        self.worker_reads = WorkerReads(
            self.reader, IndexCache(self.reader), self.handler, ByteBudget(self.config.pool_bytes),
            ReadAhead(self.config.readahead_bytes),
        )  # fmt: skip
        self._null_cache: dict[str, bytes] = {}

    def _stream(self, task: str, n: int) -> PartitionStream:
        key = f"{task}|{n}"
        if key not in self._streams:
            self._streams[key] = PartitionStream(
                task, n, self.tasks[task].shards[n], part=self.rank * self._workers + self._worker,
                parts=self.world_size * self._workers, config=self.config, worker=self.worker_reads,
            )  # fmt: skip
        return self._streams[key]

    def step_of(self, made: int) -> int:
        return self.base + self._worker + made * self._workers

    def _prepare(self) -> None:
        """Once per worker, before its first batch or its first state: restore or take over its position.

        Done eagerly on the first ``state_dict`` too: StatefulDataLoader records a worker's state
        when the worker starts, and a checkpoint taken before a worker made its first batch
        after a takeover must still hold that worker's merged streams, not empty ones.
        """
        if self._ready:
            return
        self._setup_worker()
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        if self._elastic is not None:
            self._take_over(self._elastic)
        self._ready = True

    def __iter__(self):
        self._prepare()
        while True:
            step = self.step_of(self.made)
            try:
                n = draw_num_sources(self.config.seed, step, self.plan.n_probs)
                task = draw_task(self.config.seed, self.rank, step, self.plan.task_probs[n])
                stream = self._stream(task, n)
                taken = stream.next_batch(self.config.batch_size)
                batch = self._assemble(stream, taken, step)
            except DataError as exc:
                if get_worker_info() is None:
                    raise
                # a DataLoader worker: the stop reaches the main process as data, with its own one-line message
                # (raised, it would arrive as "Caught UnusableData in DataLoader worker process 0." and a traceback)
                yield {DATA_ERROR: str(exc), "step": step}
                return
            batch["elements"] = [ref for ref, _ in taken]  # the stream positions (trace: exactly-once checks)
            self.made += 1
            yield batch

    def _assemble(self, stream: PartitionStream, taken: list[tuple[Any, RawSample]], step: int) -> dict[str, Any]:
        """Assemble ``taken`` (in place); a sample that cannot be used costs itself: the stream replaces it."""
        while True:
            try:
                batch = assemble_batch(
                    [sample for _, sample in taken],
                    self.tasks[stream.task],
                    stream.n,
                    step,
                    self.rank,
                    self.config,
                    self.reader,
                    self._null_cache,
                )
            except UnusableSample as bad:
                taken[bad.index] = stream.replacement(taken[bad.index], bad.cause)
                continue
            stream.assembled()
            return batch

    def state_dict(self) -> dict[str, Any]:
        self._prepare()
        return {
            "version": states.DATA_STATE_VERSION,
            "base": self.base,
            "made": self.made,
            "workers": self._workers,
            "world_size": self.world_size,
            "rank": self.rank,
            "streams": {key: s.state_dict() for key, s in self._streams.items()},
            "bytes_read": getattr(getattr(self, "reader", None), "bytes_read", 0),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state
        self._ready = False

    def set_elastic(self, next_step: int, partitions: list[dict[str, Any]]) -> None:
        """Resume from the dataset states of *every* worker of every rank of another layout (see loader.py).

        The new loader starts at ``next_step`` with worker 0, so that step is this layout's base.
        """
        self._elastic = {"next_step": next_step, "partitions": partitions}
        self.base, self.made = next_step, 0
        self._ready = False

    def _restore(self, state: dict[str, Any]) -> None:
        """This worker's own state of the same layout: every stream restored (bitwise exact)."""
        states.check_version(state)
        self.base = state.get("base", 0)
        if states.untouched(state):
            return
        states.check_same_layout(state, self._workers, self.world_size)
        self.made = state["made"]
        for task, n, stream_state in states.stream_states(state):
            stream = self._stream(task, n)
            if stream_state is None:
                stream.start_new_epoch({"generation": 0})
            else:
                stream.load_state_dict(stream_state)

    def _take_over(self, elastic: dict[str, Any]) -> None:
        """This worker's part of a resume from another layout: its next step, and every stream merged."""
        self.base, self.made = elastic["next_step"], 0
        for key, olds in states.takeover_states(elastic["partitions"], PartitionStream.untouched_state).items():
            task, n = states.stream_key(key)
            if task in self.tasks and n in self.tasks[task].shards:
                self._stream(task, n).load_elastic(olds)
        self._elastic = None
