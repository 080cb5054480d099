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
  a task with data at N from (seed, rank, s).  Batch ``s`` is made by worker
  ``s % W`` (the DataLoader's round-robin), so a worker knows its steps.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.common import images as imaging
from pipeline.shards.format import SOURCE_COUNTS
from pipeline.shards.reader import (
    CorruptSample,
    IndexCache,
    RangeReader,
    RawSample,
    read_indexed_sample,
    stream_shard,
)
from pipeline.shards.tasks import DataConfigError, Shard, Task
from pipeline.train.batching import assemble_batch, choose_variant
from pipeline.train.config import StreamConfig
from pipeline.train.order import Cursor, EpochOrder, merge_cursors
from pipeline.train.pools import BucketPools, ByteBudget
from pipeline.train.readahead import ReadAhead
from pipeline.train.seeding import stable_id, step_rng

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 1000
POOL_BATCHES = 4  # a stream's bucket pools hold at most this many batches' worth of samples
DATA_STATE_VERSION = 2


# ---------------------------------------------------------------------------------------------
# per-step draws (pure functions of seed, rank, step)


def draw_num_sources(seed: int, step: int, n_probs: dict[int, float]) -> int:
    """N for ``step``: a function of (seed, step) only, so every rank draws the same."""
    ns = sorted(n_probs)
    return ns[int(step_rng(seed, 1, step).choice(len(ns), p=[n_probs[n] for n in ns]))]


def draw_task(seed: int, rank: int, step: int, task_probs: dict[str, float]) -> str:
    """Task for (rank, step) among those with data at this step's N, by weight."""
    names = sorted(task_probs)
    return names[int(step_rng(seed, 2, rank, step).choice(len(names), p=[task_probs[t] for t in names]))]


@dataclass
class MixPlan:
    """Normalised source-count probabilities and, per N, task probabilities."""

    n_probs: dict[int, float]
    task_probs: dict[int, dict[str, float]]


def plan_mix(tasks: dict[str, Task], task_weights: dict[str, float], n_weights: dict[str, float]) -> MixPlan:
    """Check the weights against the data; warn about counts without data; renormalise."""
    unknown = sorted(set(task_weights) - set(tasks))
    if unknown:
        raise DataConfigError(f"--train_data_weights names unknown task(s) {unknown}; available tasks: {sorted(tasks)}")
    bad_n = sorted(k for k in n_weights if k not in {str(n) for n in SOURCE_COUNTS})
    if bad_n:
        raise DataConfigError(f"--train_src_img_num_weights keys must be 0-3, got {bad_n}")
    used = {t: w for t, w in task_weights.items() if w > 0}
    task_probs: dict[int, dict[str, float]] = {}
    n_probs: dict[int, float] = {}
    for key, weight in n_weights.items():
        n = int(key)
        if weight <= 0:
            continue
        having = {t: w for t, w in used.items() if tasks[t].shards.get(n)}
        if not having:
            log.warning(
                "source count %d has weight %g but no listed task has data with %d source(s); ignored", n, weight, n
            )
            continue
        total = sum(having.values())
        task_probs[n] = {t: w / total for t, w in having.items()}
        n_probs[n] = weight
    if not n_probs:
        raise DataConfigError(
            "nothing to train on: no source count with positive weight has data in the listed tasks "
            f"(tasks: { {t: sorted(tasks[t].counts()) for t in used} })"
        )
    total = sum(n_probs.values())
    return MixPlan({n: w / total for n, w in n_probs.items()}, task_probs)


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

    Stages, each with its own state: the *source* — indexed shards follow a computed
    sample-level order (:class:`EpochOrder`) through a :class:`Cursor`; streamed shards
    (``pipe:``, no index) are read front to back, every ``parts``-th sample owned, and mixed
    in a shuffle buffer — then the *pools* (:class:`BucketPools`) that make batches of one
    aspect bucket.
    """

    def __init__(
        self,
        task: str,
        num_sources: int,
        shards: list[Shard],
        part: int,
        parts: int,
        seed: int,
        shuffle_buffer: int,
        reader: RangeReader,
        index_cache: IndexCache,
        storage_options: dict | None,
        batch_size: int = 1,
        budget: ByteBudget | None = None,
        choose: Callable[[dict, np.random.Generator], tuple[str, str, bool]] | None = None,
        fetch_embeddings: bool = True,
        readahead: ReadAhead | None = None,
    ):
        self.task, self.n, self.shards = task, num_sources, shards
        self.part, self.parts, self.seed = part, parts, seed
        self.reader, self.index_cache, self.storage_options = reader, index_cache, storage_options
        self.indexed = all(s.index_url and s.samples is not None for s in shards)
        self.counts = [s.samples or 0 for s in shards]
        self.total = sum(self.counts)
        self.digest = shard_digest(shards)
        if self.indexed and self.total == 0:
            raise DataConfigError(f"task {task}: the shards with {num_sources} source(s) hold no samples")
        self.order = EpochOrder(self.counts, seed, (stable_id(task), num_sources)) if self.indexed else None
        self.cursor = Cursor(part, parts)
        self.generation = 0  # how many times the shard list changed under a resumed run
        self.budget = budget or ByteBudget(1 << 62)
        self.buffer_size = 0 if self.indexed else max(0, shuffle_buffer)  # indexed: the order is already shuffled
        self.rng = np.random.Generator(np.random.PCG64([seed & 0xFFFFFFFF, stable_id(task), num_sources, part]))
        self.seq = {"epoch": 0, "pos": 0, "sample": 0, "ordinal": 0}  # streamed cursor
        self._seq_iter = None
        self.buffer: list[tuple[Any, RawSample]] = []
        self.pools = BucketPools(batch_size, POOL_BATCHES * batch_size, self.budget)
        self.skipped = 0
        self._replaced = 0
        self.choose, self.fetch_embeddings = choose, fetch_embeddings
        self.readahead = readahead
        self.ahead: dict[int, tuple[Future, int]] = {}  # element -> (read in flight, bytes reserved)
        self.depth = max(4, 2 * batch_size)
        self._perm_cache: tuple[int, np.ndarray] | None = None

    # ---- source: indexed -------------------------------------------------------------------
    def _entry(self, g: int) -> tuple[str, dict]:
        shard_index, sample_index = self.order.locate(g)
        shard = self.shards[shard_index]
        return shard.url, self.index_cache.get(shard.index_url)[sample_index]

    def _load(self, g: int, url: str, entry: dict) -> RawSample:
        """One sample by range reads; with ``choose``, its variant drawn from (seed, task, N, g) and that
        embedding read too (so read-ahead brings everything the batch needs)."""
        sample = read_indexed_sample(self.reader, url, entry)
        if self.choose is not None:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, stable_id(self.task), self.n, g, 7])
            sample.choice = self.choose(sample.meta, rng)
            variant = sample.choice[0]
            if self.fetch_embeddings and variant in sample.embedding_ranges:
                sample.embeddings[variant] = self.reader.read(url, *sample.embedding_ranges[variant])
        return sample

    def _read_element(self, g: int) -> RawSample:
        """Element ``g``: from the read-ahead when it is in flight, else read now; then top the read-ahead up."""
        pending = self.ahead.pop(g, None)
        try:
            if pending is not None:
                future, size = pending
                try:
                    return future.result()
                finally:
                    self.readahead.release(size)
            return self._load(g, *self._entry(g))
        finally:
            self._top_up()

    def _top_up(self) -> None:
        if self.readahead is None or not self.readahead.enabled or not self.indexed:
            return
        for g in self.cursor.peek(self.depth):
            if g in self.ahead:
                continue
            try:
                url, entry = self._entry(g)
            except Exception:  # noqa: BLE001 - the element's own read will report it
                return
            members = entry["members"]
            size = sum(m[1] for ext, m in members.items() if not ext.startswith("emb_"))
            size += max((m[1] for ext, m in members.items() if ext.startswith("emb_")), default=0)
            future = self.readahead.try_submit(size, lambda g=g, url=url, entry=entry: self._load(g, url, entry))
            if future is None:
                return
            self.ahead[g] = (future, size)

    def drop_readahead(self) -> None:
        """Forget reads in flight (their elements are read again when taken)."""
        for future, size in self.ahead.values():
            future.cancel()
            self.readahead.release(size)
        self.ahead.clear()

    def _next_owned(self) -> tuple[Any, RawSample]:
        bad = 0
        while True:
            try:
                if self.indexed:
                    g = self.cursor.next()
                    return g, self._read_element(g)
                return self._next_streamed()
            except (DataConfigError, KeyboardInterrupt):
                raise
            except FileNotFoundError as exc:  # a shard that is gone does not come back by retrying
                raise DataConfigError(f"task {self.task} N={self.n}: a shard is missing: {exc}") from exc
            except PermissionError as exc:
                raise DataConfigError(f"task {self.task} N={self.n}: a shard cannot be read: {exc}") from exc
            except Exception as exc:  # a broken sample costs that sample, not the run
                self.skipped += 1
                bad += 1
                log.warning(
                    "task %s N=%d: skipped a sample (%s: %s; %d skipped so far)",
                    self.task,
                    self.n,
                    type(exc).__name__,
                    exc,
                    self.skipped,
                )
                if bad >= min(MAX_CONSECUTIVE_BAD, max(self.total, 1) if self.indexed else MAX_CONSECUTIVE_BAD):
                    raise RuntimeError(f"task {self.task} N={self.n}: {bad} unreadable samples in a row") from exc

    # ---- source: streamed ------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        """Shard order of a streamed ``epoch`` (the same for every partition)."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, stable_id(self.task), self.n, epoch, 3])
            self._perm_cache = (epoch, rng.permutation(len(self.shards)))
        return self._perm_cache[1]

    def _next_streamed(self) -> tuple[Any, RawSample]:
        if self._seq_iter is None:
            self._seq_iter = self._streamed()
        return next(self._seq_iter)

    def _streamed(self):
        st = self.seq
        while True:
            perm = self._order(st["epoch"])
            whole_epoch, usable = st["pos"] == 0 and st["sample"] == 0, 0
            while st["pos"] < len(perm):
                index, skip = int(perm[st["pos"]]), st["sample"]
                for i, sample in enumerate(stream_shard(self.shards[index].url, self.storage_options)):
                    if i < skip:
                        continue
                    st["sample"] = i + 1
                    owned = st["ordinal"] % self.parts == self.part
                    st["ordinal"] += 1
                    if isinstance(sample, CorruptSample):
                        if owned:
                            self.skipped += 1
                            log.warning("task %s N=%d: skipped %s", self.task, self.n, sample.reason)
                        continue
                    usable += 1
                    if owned:
                        yield [index, i], sample
                st["pos"] += 1
                st["sample"] = 0
            if whole_epoch and not usable:  # nothing in a whole pass can be used: an error, not an endless loop
                raise DataConfigError(
                    f"task {self.task}: no usable sample with {self.n} source(s) in a whole pass over its "
                    f"{len(self.shards)} shard(s) (every one unreadable, truncated or empty)"
                )
            st["epoch"] += 1
            st["pos"] = 0

    def _next_item(self) -> tuple[Any, RawSample]:
        """The next owned sample: in computed order (indexed) or through the shuffle buffer (streamed)."""
        if self.buffer_size <= 1:
            return self._next_owned()
        while len(self.buffer) < self.buffer_size and not (self.budget.spent() and self.buffer):
            ref, sample = self._next_owned()
            self.buffer.append((ref, sample))
            self.budget.used += sample_bytes(sample)
        j = int(self.rng.integers(len(self.buffer)))
        out = self.buffer[j]
        self.budget.used -= sample_bytes(out[1])
        if self.budget.spent():  # the worker's budget is spent: the buffer shrinks instead of refilling
            self.buffer.pop(j)
        else:
            ref, sample = self._next_owned()
            self.buffer[j] = (ref, sample)
            self.budget.used += sample_bytes(sample)
        return out

    # ---- pools -------------------------------------------------------------------------------
    def next_batch(self, batch_size: int) -> list[tuple[Any, RawSample]]:
        """(reference, sample) × ``batch_size``, of one aspect bucket (or similar, when the pools are full)."""
        self.pools.batch_size = batch_size
        self._replaced = 0  # the previous batch was assembled
        while True:
            ref, sample = self._next_item()
            batch = self.pools.add(tuple(sample.meta["bucket"]), (ref, sample), sample_bytes(sample))
            if batch is not None:
                return batch

    def replacement(self, bucket: tuple) -> RawSample:
        """Another sample of ``bucket``, for one that turned out unreadable while its batch was built."""
        self.skipped += 1
        self._replaced += 1
        if self._replaced > MAX_CONSECUTIVE_BAD:  # every replacement failed too: the data is unusable, do not spin
            raise DataConfigError(
                f"task {self.task} N={self.n}: {self._replaced} samples in a row could not be decoded "
                "(images or embeddings); check it with python -m shards_tools verify"
            )
        waiting = self.pools.pop_from(bucket)
        if waiting is not None:
            return waiting[1]
        for _ in range(self.pools.max_samples):
            ref, sample = self._next_item()
            if tuple(sample.meta["bucket"]) == tuple(bucket):
                return sample
            self.pools.hold(tuple(sample.meta["bucket"]), (ref, sample), sample_bytes(sample))
        log.warning("task %s N=%d: no sample of bucket %s nearby; another bucket's instead", self.task, self.n, bucket)
        return self._next_item()[1]

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "digest": self.digest,
            "indexed": self.indexed,
            "generation": self.generation,
            "skipped": self.skipped,
            "pools": self.pools.state_dict(lambda item: item[0]),
        }
        if self.indexed:
            state["cursor"] = self.cursor.state_dict()
        else:
            state["seq"] = dict(self.seq)
            state["rng"] = self.rng.bit_generator.state
            state["buffer"] = [ref for ref, _ in self.buffer]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drop_readahead()
        self.skipped = state.get("skipped", 0)
        if state.get("digest") != self.digest or state.get("indexed") != self.indexed:
            self.start_new_epoch(state)
            return
        self.generation = state["generation"]
        if self.indexed:
            self.cursor = Cursor.from_state(state["cursor"])
        else:
            self.seq = dict(state["seq"])
            self._seq_iter = None
            self.rng.bit_generator.state = state["rng"]
        pooled = [ref for _, entries in state["pools"]["pools"] for _, ref in entries]
        samples = self._reread([*state.get("buffer", []), *pooled])
        self.buffer = []
        for ref in state.get("buffer", []):
            self.buffer.append((ref, samples[_key(ref)]))
            self.budget.used += sample_bytes(samples[_key(ref)])
        self.pools.load_state_dict(
            state["pools"], lambda ref: ((ref, samples[_key(ref)]), sample_bytes(samples[_key(ref)]))
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
        self.drop_readahead()
        epoch = self.generation * GENERATION_EPOCHS
        if self.indexed:
            self.cursor = Cursor(self.part, self.parts, base=epoch * self.total)
        else:
            self.seq = {"epoch": epoch, "pos": 0, "sample": 0, "ordinal": 0}
            self._seq_iter = None

    def load_elastic(self, olds: list[dict[str, Any]]) -> int:
        """Take over from every partition of another (ranks × workers) layout; returns the samples re-read.

        The cursors merge (each element exactly once); the samples that waited in the old
        pools go to the new partition ``ref % parts`` and wait again here.
        """
        if any(o.get("digest") != self.digest for o in olds) or not all(o.get("indexed") for o in olds):
            if not self.indexed or not all(o.get("indexed") for o in olds):
                raise DataConfigError(
                    f"task {self.task} N={self.n}: streamed shards (pipe: or without an index) resume only on the "
                    "same ranks × DataLoader workers; index them (shards_tools) or resume with the same layout"
                )
            self.start_new_epoch(olds[0])
            return 0
        self.drop_readahead()
        self.skipped = sum(o.get("skipped", 0) for o in olds)
        self.generation = olds[0]["generation"]
        self.cursor = merge_cursors([Cursor.from_state(o["cursor"]) for o in olds], self.parts)[self.part]
        waiting = [ref for o in olds for _, entries in o["pools"]["pools"] for _, ref in entries]
        mine = sorted(ref for ref in waiting if ref % self.parts == self.part)
        for ref in mine:
            sample = self._read_element(ref)
            self.pools.hold(tuple(sample.meta["bucket"]), (ref, sample), sample_bytes(sample))
        return len(mine)

    def _reread(self, refs: list) -> dict[Any, RawSample]:
        """Fetch buffered samples again: one range read each, or one pass per shard when streamed."""
        if self.indexed:
            return {ref: self._read_element(ref) for ref in refs}
        wanted: dict[int, set[int]] = {}
        for shard_index, sample_index in refs:
            wanted.setdefault(shard_index, set()).add(sample_index)
        out = {}
        for shard_index, indices in wanted.items():
            for i, sample in enumerate(stream_shard(self.shards[shard_index].url, self.storage_options)):
                if i in indices and not isinstance(sample, CorruptSample):
                    out[(shard_index, i)] = sample
                if i >= max(indices):
                    break
        missing = [r for r in refs if _key(r) not in out]
        if missing:
            raise RuntimeError(f"task {self.task} N={self.n}: cannot re-read buffered samples {missing[:3]}")
        return out


def _key(ref: Any) -> Any:
    return tuple(ref) if isinstance(ref, list) else ref


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
        self._loaded: dict[str, Any] | None = None
        self._elastic: dict[str, Any] | None = None
        self._streams: dict[str, PartitionStream] = {}
        self._workers = 1
        self._worker = 0

    def _setup_worker(self) -> None:
        info = get_worker_info()
        self._worker, self._workers = (info.id, info.num_workers) if info else (0, 1)
        self.reader = RangeReader(self.config.storage_options)
        self.index_cache = IndexCache(self.reader)
        self.budget = ByteBudget(self.config.pool_bytes)
        self.readahead = ReadAhead(self.config.readahead_bytes)
        self._null_cache: dict[str, bytes] = {}

    def _stream(self, task: str, n: int) -> PartitionStream:
        key = f"{task}|{n}"
        if key not in self._streams:
            self._streams[key] = PartitionStream(
                task,
                n,
                self.tasks[task].shards[n],
                part=self.rank * self._workers + self._worker,
                parts=self.world_size * self._workers,
                seed=self.config.seed,
                shuffle_buffer=self.config.shuffle_buffer,
                reader=self.reader,
                index_cache=self.index_cache,
                storage_options=self.config.storage_options,
                batch_size=self.config.batch_size,
                budget=self.budget,
                choose=self._choose,
                fetch_embeddings=not self.config.online_prompts,
                readahead=self.readahead,
            )
        return self._streams[key]

    def _choose(self, meta: dict, rng: np.random.Generator) -> tuple[str, str, bool]:
        c = self.config
        return choose_variant(meta, rng, c.enable_inverse, c.text_drop_ratio, stored=not c.online_prompts)

    def step_of(self, made: int) -> int:
        return self._worker + made * self._workers

    def __iter__(self):
        self._setup_worker()
        if self._elastic is not None:
            self._take_over(self._elastic)
        elif self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        while True:
            step = self.step_of(self.made)
            n = draw_num_sources(self.config.seed, step, self.plan.n_probs)
            task = draw_task(self.config.seed, self.rank, step, self.plan.task_probs[n])
            stream = self._stream(task, n)
            taken = stream.next_batch(self.config.batch_size)
            batch = assemble_batch(
                [sample for _, sample in taken],
                self.tasks[task],
                n,
                step,
                self.rank,
                self.config,
                self.reader,
                self._null_cache,
                replace=stream.replacement,  # a corrupt image or embedding costs a sample, not the run
            )
            batch["elements"] = [ref for ref, _ in taken]  # the stream positions (trace: exactly-once checks)
            self.made += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": DATA_STATE_VERSION,
            "made": self.made,
            "workers": self._workers,
            "world_size": self.world_size,
            "rank": self.rank,
            "streams": {key: s.state_dict() for key, s in self._streams.items()},
            "bytes_read": getattr(getattr(self, "reader", None), "bytes_read", 0),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state

    def set_elastic(self, next_step: int, partitions: list[dict[str, Any]]) -> None:
        """Resume from the dataset states of *every* worker of every rank of another layout (see data.py)."""
        self._elastic = {"next_step": next_step, "partitions": partitions}

    def _restore(self, state: dict[str, Any]) -> None:
        version = state.get("version", 1)
        if version > DATA_STATE_VERSION:
            raise DataConfigError(
                f"the checkpoint's data state is version {version}; this version reads up to "
                f"{DATA_STATE_VERSION}: resume with the version that wrote it"
            )
        if state["made"] == 0 and not state["streams"]:
            return  # this worker had not made a batch when the checkpoint was taken: nothing to restore
        if state["workers"] != self._workers or state["world_size"] != self.world_size:
            raise DataConfigError(  # the loop takes another layout over with set_elastic; this is a direct misuse
                f"this worker's state is of {state['world_size']} rank(s) × {state['workers']} worker(s), the run "
                f"has {self.world_size} × {self._workers}; resume through the checkpoint folder (set_elastic)"
            )
        self.made = state["made"]
        for key, stream_state in state["streams"].items():
            task, n = key.rsplit("|", 1)
            stream = self._stream(task, int(n))
            if version < 2:  # written before the sample-level order: positions cannot be mapped
                stream.start_new_epoch({"generation": 0})
            else:
                stream.load_state_dict(stream_state)

    def _take_over(self, elastic: dict[str, Any]) -> None:
        """This worker's part of a resume from another layout: its next step, and every stream merged."""
        start = elastic["next_step"]
        self.made = max(0, -(-(start - self._worker) // self._workers))  # steps s < start with s ≡ worker (mod W)
        by_stream: dict[str, list[dict[str, Any]]] = {}
        for partition in elastic["partitions"]:
            for key, stream_state in partition["streams"].items():
                by_stream.setdefault(key, []).append(stream_state)
        parts = len(elastic["partitions"])
        for key, olds in by_stream.items():
            task, n = key.rsplit("|", 1)
            if task not in self.tasks or int(n) not in self.tasks[task].shards:
                continue
            # partitions that never read this stream had consumed nothing of it
            present = {o["cursor"]["part"] for o in olds if "cursor" in o}
            template = next((o for o in olds if "cursor" in o), None)
            if template is not None:
                for p in range(parts):
                    if p not in present:
                        olds.append(
                            {
                                **template,
                                "cursor": {**template["cursor"], "part": p, "k": 0},
                                "pools": {"arrivals": 0, "pools": []},
                                "skipped": 0,
                            }
                        )
            self._stream(task, int(n)).load_elastic(olds)
        self._elastic = None
