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

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.shards.format import SOURCE_COUNTS
from pipeline.shards.reader import CorruptSample, IndexCache, RangeReader, RawSample, read_indexed_sample, stream_shard
from pipeline.shards.tasks import DataConfigError, Shard, Task
from pipeline.train.batching import assemble_batch
from pipeline.train.config import StreamConfig
from pipeline.train.seeding import stable_id, step_rng

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 1000


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


class PartitionStream:
    """The samples of one (task, N) that partition ``part`` of ``parts`` owns: endless, shuffled, bucketed."""

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
    ):
        self.task, self.n, self.shards = task, num_sources, shards
        self.part, self.parts, self.seed = part, parts, seed
        self.reader, self.index_cache, self.storage_options = reader, index_cache, storage_options
        self.indexed = all(s.index_url and s.samples is not None for s in shards)
        self.counts = [s.samples or 0 for s in shards]
        self.total = sum(self.counts)
        if self.indexed and self.total == 0:
            raise DataConfigError(f"task {task}: the shards with {num_sources} source(s) hold no samples")
        # no bigger than this partition's share of an epoch, so a small stream does not repeat inside the buffer
        share = -(-self.total // parts) if self.indexed else shuffle_buffer
        self.buffer_size = max(0, min(shuffle_buffer, share))
        self.rng = np.random.Generator(np.random.PCG64([seed & 0xFFFFFFFF, stable_id(task), num_sources, part]))
        self.k = 0  # owned elements consumed (indexed)
        self.seq = {"epoch": 0, "pos": 0, "sample": 0, "ordinal": 0}  # streamed cursor
        self._seq_iter = None
        self.buffer: list[tuple[list[int], RawSample]] = []
        self.pools: dict[tuple, list[tuple[list[int], RawSample]]] = {}
        self.skipped = 0
        self._perm_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    # ---- the underlying sequence -----------------------------------------------------------
    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard order of ``epoch`` (same for every partition) and cumulative sample counts."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = np.random.default_rng([self.seed & 0xFFFFFFFF, stable_id(self.task), self.n, epoch, 3]).permutation(
                len(self.shards)
            )
            cum = np.cumsum([self.counts[i] for i in perm])
            self._perm_cache = (epoch, perm, cum)
        return self._perm_cache[1], self._perm_cache[2]

    def _ref_of(self, k: int) -> list[int]:
        """[shard index, sample index] of this partition's ``k``-th element (indexed shards)."""
        g = self.part + k * self.parts
        epoch, q = divmod(g, self.total)
        perm, cum = self._order(epoch)
        j = int(np.searchsorted(cum, q, side="right"))
        before = int(cum[j - 1]) if j else 0
        return [int(perm[j]), q - before]

    def _read_ref(self, ref: list[int]) -> RawSample:
        shard = self.shards[ref[0]]
        entry = self.index_cache.get(shard.index_url)[ref[1]]
        return read_indexed_sample(self.reader, shard.url, entry)

    def _next_owned(self) -> tuple[list[int], RawSample]:
        bad = 0
        while True:
            try:
                if self.indexed:
                    ref = self._ref_of(self.k)
                    self.k += 1
                    return ref, self._read_ref(ref)
                return self._next_streamed()
            except (DataConfigError, KeyboardInterrupt):
                raise
            except Exception as exc:  # a broken sample or shard costs that sample, not the run
                self.skipped += 1
                bad += 1
                log.warning("task %s N=%d: skipped a sample (%s: %s)", self.task, self.n, type(exc).__name__, exc)
                if bad >= MAX_CONSECUTIVE_BAD:
                    raise RuntimeError(f"task {self.task} N={self.n}: {bad} unreadable samples in a row") from exc

    def _next_streamed(self) -> tuple[list[int], RawSample]:
        if self._seq_iter is None:
            self._seq_iter = self._streamed()
        return next(self._seq_iter)

    def _streamed(self):
        st = self.seq
        while True:
            perm, _ = self._order(st["epoch"])
            whole_epoch, read_any = st["pos"] == 0 and st["sample"] == 0, False
            while st["pos"] < len(perm):
                index, skip = int(perm[st["pos"]]), st["sample"]
                for i, sample in enumerate(stream_shard(self.shards[index].url, self.storage_options)):
                    if i < skip:
                        continue
                    read_any = True
                    st["sample"] = i + 1
                    owned = st["ordinal"] % self.parts == self.part
                    st["ordinal"] += 1
                    if owned and isinstance(sample, CorruptSample):
                        self.skipped += 1
                        log.warning("task %s N=%d: skipped %s", self.task, self.n, sample.reason)
                    elif owned:
                        yield [index, i], sample
                st["pos"] += 1
                st["sample"] = 0
            if whole_epoch and not read_any:
                raise DataConfigError(f"task {self.task}: no readable sample with {self.n} source(s) in any shard")
            st["epoch"] += 1
            st["pos"] = 0

    # ---- shuffle buffer and aspect buckets -------------------------------------------------
    def _next_shuffled(self) -> tuple[list[int], RawSample]:
        if self.buffer_size <= 1:
            return self._next_owned()
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._next_owned())
        j = int(self.rng.integers(len(self.buffer)))
        out = self.buffer[j]
        self.buffer[j] = self._next_owned()
        return out

    def next_batch(self, batch_size: int) -> list[RawSample]:
        """``batch_size`` samples of one aspect bucket."""
        while True:
            ref, sample = self._next_shuffled()
            bucket = tuple(sample.meta["bucket"])
            pool = self.pools.setdefault(bucket, [])
            pool.append((ref, sample))
            if len(pool) >= batch_size:
                taken, rest = pool[:batch_size], pool[batch_size:]
                if rest:
                    self.pools[bucket] = rest
                else:
                    del self.pools[bucket]
                return [s for _, s in taken]

    def replacement(self, bucket: tuple) -> RawSample:
        """Another sample of ``bucket``, for one that turned out unreadable while its batch was built."""
        self.skipped += 1
        for _ in range(max(1000, 10 * self.total)):
            pool = self.pools.get(bucket)
            if pool:
                _, sample = pool.pop(0)
                if not pool:
                    del self.pools[bucket]
                return sample
            ref, sample = self._next_shuffled()
            self.pools.setdefault(tuple(sample.meta["bucket"]), []).append((ref, sample))
        raise RuntimeError(f"task {self.task} N={self.n}: no readable replacement sample in bucket {bucket}")

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "seq": dict(self.seq),
            "rng": self.rng.bit_generator.state,
            "buffer": [ref for ref, _ in self.buffer],
            "pools": [[list(bucket), [ref for ref, _ in pool]] for bucket, pool in self.pools.items()],
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k = state["k"]
        self.seq = dict(state["seq"])
        self._seq_iter = None
        self.rng.bit_generator.state = state["rng"]
        self.skipped = state.get("skipped", 0)
        refs = [tuple(r) for r in state["buffer"]] + [tuple(r) for _, pool in state["pools"] for r in pool]
        samples = self._reread(refs)
        self.buffer = [(list(r), samples[tuple(r)]) for r in state["buffer"]]
        self.pools = {tuple(b): [(list(r), samples[tuple(r)]) for r in pool] for b, pool in state["pools"]}

    def _reread(self, refs: list[tuple[int, int]]) -> dict[tuple[int, int], RawSample]:
        """Fetch buffered samples again: one range read each, or one pass per shard when streamed."""
        if self.indexed:
            return {ref: self._read_ref(list(ref)) for ref in refs}
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
        missing = [r for r in refs if r not in out]
        if missing:
            raise RuntimeError(f"task {self.task} N={self.n}: cannot re-read buffered samples {missing[:3]}")
        return out


# ---------------------------------------------------------------------------------------------
# the dataset the DataLoader iterates


class MixedBatchDataset(IterableDataset):
    """Endless batches for one rank; each DataLoader worker makes the steps ``s ≡ worker (mod W)``.

    Implements ``state_dict``/``load_state_dict`` (torchdata's Stateful protocol) with
    JSON-able state, so ``StatefulDataLoader`` checkpoints it per worker.
    """

    def __init__(self, tasks: dict[str, Task], plan: MixPlan, rank: int, world_size: int, config: StreamConfig):
        self.tasks, self.plan, self.rank, self.world_size, self.config = tasks, plan, rank, world_size, config
        self.made = 0  # batches this worker made
        self._loaded: dict[str, Any] | None = None
        self._streams: dict[str, PartitionStream] = {}
        self._workers = 1
        self._worker = 0

    def _setup_worker(self) -> None:
        info = get_worker_info()
        self._worker, self._workers = (info.id, info.num_workers) if info else (0, 1)
        self.reader = RangeReader(self.config.storage_options)
        self.index_cache = IndexCache(self.reader)
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
            )
        return self._streams[key]

    def step_of(self, made: int) -> int:
        return self._worker + made * self._workers

    def __iter__(self):
        self._setup_worker()
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        while True:
            step = self.step_of(self.made)
            n = draw_num_sources(self.config.seed, step, self.plan.n_probs)
            task = draw_task(self.config.seed, self.rank, step, self.plan.task_probs[n])
            stream = self._stream(task, n)
            raw = stream.next_batch(self.config.batch_size)
            batch = assemble_batch(
                raw,
                self.tasks[task],
                n,
                step,
                self.rank,
                self.config,
                self.reader,
                self._null_cache,
                replace=stream.replacement,  # a corrupt image or embedding costs a sample, not the run
            )
            self.made += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "made": self.made,
            "workers": self._workers,
            "world_size": self.world_size,
            "rank": self.rank,
            "streams": {key: s.state_dict() for key, s in self._streams.items()},
            "bytes_read": getattr(getattr(self, "reader", None), "bytes_read", 0),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state

    def _restore(self, state: dict[str, Any]) -> None:
        if state["made"] == 0 and not state["streams"]:
            return  # this worker had not made a batch when the checkpoint was taken: nothing to restore
        if state["workers"] != self._workers or state["world_size"] != self.world_size:
            raise DataConfigError(
                f"exact resume needs the same ranks × workers as the checkpoint "
                f"({state['world_size']} × {state['workers']}), got {self.world_size} × {self._workers}"
            )
        self.made = state["made"]
        for key, stream_state in state["streams"].items():
            task, n = key.rsplit("|", 1)
            self._stream(task, int(n)).load_state_dict(stream_state)
