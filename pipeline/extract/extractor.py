"""One rank's extraction: JSONL lines → prepared samples → encoder batches → shards, then the manifest.

Flow per rank: DataLoader workers turn this rank's pending lines into prepared
samples (``extract/prepare.py``); the main process groups their prompts into
encoder batches (``PromptBatcher``) and runs the VLM (``common/encoder.py``);
finished samples go to the background shard writer (``shards/writer.py``), which
publishes shards and commit records (``shards/commits.py``), opened through the
task directory's session (``shards/taskdir.py``).  When every rank is done, rank 0
writes the null embedding and, last, ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import families
from pipeline.common.options import derived
from pipeline.common.records import Columns
from pipeline.common.workers import die_with_parent
from pipeline.errors import UserError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.prepare import Failure, LineDataset, PreparedSample, PrepareOptions
from pipeline.shards import commits
from pipeline.shards.format import NULL_EMBEDDING, embedding_to_npy, new_manifest
from pipeline.shards.storage import Store, options_for, parse_storage_options
from pipeline.shards.taskdir import TaskDirectory
from pipeline.shards.writer import ShardSink

log = logging.getLogger("pipeline.extract")


# ---------------------------------------------------------------------------------------------
# Batching prompts for the encoder


@dataclass
class _Entry:
    sample: PreparedSample
    remaining: int
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    failed: bool = False


class PromptBatcher:
    """Groups prompts of many samples into encoder batches.

    ``exact`` groups by (kind, token length): no padding, so a prompt's result
    does not depend on its batch mates.  ``padded`` groups by (kind, length//64)
    and pads.  The pool is bounded: past ``pool_limit`` prompts the largest
    group runs even if not full.
    """

    def __init__(self, batch_size: int, exact: bool, pool_limit: int):
        self.batch_size, self.exact, self.pool_limit = batch_size, exact, pool_limit
        self.groups: dict[tuple, list[tuple[int, str, Any]]] = defaultdict(list)
        self.size = 0

    def add(self, sample_id: int, variant: str, inputs: Any) -> list[list]:
        key = (inputs.kind, inputs.length if self.exact else inputs.length // 64)
        group = self.groups[key]
        group.append((sample_id, variant, inputs))
        self.size += 1
        ready = []
        if len(group) >= self.batch_size:
            ready.append(self._take(key))
        while self.size > self.pool_limit:
            ready.append(self._take(max(self.groups, key=lambda k: len(self.groups[k]))))
        return ready

    def drain(self) -> list[list]:
        return [self._take(k) for k in sorted(self.groups, key=str)]

    def _take(self, key) -> list:
        batch = self.groups.pop(key)
        self.size -= len(batch)
        return batch


# ---------------------------------------------------------------------------------------------


def _identity(item):
    return item


FINGERPRINT_BYTES = 64 << 20


def input_fingerprint(url: str, storage_options: dict | None) -> dict[str, Any]:
    """Size and sha256 of the first 64 MiB of the input JSONL: another file under the same name is noticed."""
    digest = hashlib.sha256()
    fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    if not fs.isfile(path):
        raise UserError(f"the input JSONL {url} does not exist (or is not a file)")
    with fs.open(path, "rb") as handle:
        remaining = FINGERPRINT_BYTES
        while remaining > 0:
            block = handle.read(min(remaining, 1 << 20))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
    return {"input_size": fs.size(path), "input_sha256_first_64MiB": digest.hexdigest()}


class Extractor:
    """One rank's extraction run."""

    def __init__(self, config: ExtractConfig, rank: int, world: int):
        self.config, self.rank, self.world = config, rank, world
        self.storage_options = parse_storage_options(config.storage_options, config.output_dir)
        self.store = Store(config.output_dir, self.storage_options)
        self.task = config.output_dir.rstrip("/").rsplit("/", 1)[-1]
        self.inverse = not (config.disable_inverse or config.t2i_mode)
        self.family = families.detect(config.model_path)
        if config.prompt_style not in self.family.prompt_styles:
            raise UserError(
                f"--prompt_style {config.prompt_style}: the {self.family.name} family has "
                f"{', '.join(self.family.prompt_styles)}"
            )
        self.builder, self.encoder = None, None
        if not config.skip_embeddings:
            self.builder = self.family.prompt_builder(
                config.model_path, config.prompt_style, config.crop_scale, config.condition_resolution
            )
            if self.builder.fixed_conditions and config.train_copy_size:
                raise UserError(
                    f"--train_copy_size: training copies are RGB crops, and the {self.family.name} family's images are "
                    "RGBA with conditions fixed at extraction; extract without it"
                )
            self.encoder = self.family.prompt_encoder(config.model_path, config.device, config.dtype)
        self.forward_seconds = 0.0
        self.forwards = 0  # encoder forwards and the prompts they carried: how full the batches are
        self.prompts_encoded = 0
        self.failures_by_kind: dict[str, int] = defaultdict(int)

    # ---- main loop -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.taskdir = TaskDirectory(
            self.config.output_dir,
            self.storage_options,
            self.identity(),
            f"To start fresh, choose a new --output_dir or delete {self.config.output_dir}; "
            "to resume, rerun with the first run's input and flags.",
            adopt_unrecorded=True,
        )
        lease = self.taskdir.lease(self.rank)
        try:
            return self._run()
        finally:
            lease.release()

    def _run(self) -> dict[str, Any]:
        self.taskdir.load_commits()
        # each rank cleans its own leftovers; rank 0 also those of ranks a larger earlier run had
        self.taskdir.remove_orphans(lambda r: r == self.rank or (self.rank == 0 and r >= self.world))
        opts = derived(PrepareOptions, self.config, inverse=self.inverse, storage_options=self.storage_options)
        columns = Columns(self.config.source_column, self.config.target_column)
        done = self.taskdir.done_lines()
        dataset = LineDataset(self.config.jsonl_path, self.rank, self.world, done, self.builder, opts, columns)
        total = sum(1 for _ in dataset.pending())
        log.info("%d line(s) to process on this rank; %d line(s) of the task done before", total, int(done.sum()))
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.config.num_workers,
            worker_init_fn=die_with_parent,
            prefetch_factor=self.config.prefetch_factor if self.config.num_workers else None,
            collate_fn=_identity,
        )
        sink = self.taskdir.open_writer(
            self.rank,
            self.config.max_samples_per_shard,
            self.config.max_shard_bytes,
            queue_size=self.config.queue_size,
            tmp_dir=self.config.tmp_dir,
            max_sequence_length=self.config.max_sequence_length,
        )
        batcher = PromptBatcher(
            self.config.batch_size, self.config.batching == "exact", max(64, 16 * self.config.batch_size)
        )
        entries: dict[int, _Entry] = {}
        started = time.perf_counter()
        bar = tqdm(total=total, desc=f"rank {self.rank}", unit="sample", dynamic_ncols=True, mininterval=1.0)
        try:
            for sample_id, item in enumerate(loader):
                if isinstance(item, Failure):
                    self._fail(sink, item, bar)
                    continue
                if not item.prompts:
                    sink.add_sample(item, {})
                    bar.update(1)
                    continue
                entries[sample_id] = _Entry(item, len(item.prompts))
                for variant, inputs in item.prompts:
                    for batch in batcher.add(sample_id, variant, inputs):
                        self._encode(batch, entries, sink, bar)
                item.prompts = []  # the batcher holds the inputs now
            for batch in batcher.drain():
                self._encode(batch, entries, sink, bar)
        finally:
            bar.close()
            sink.close()
        return self._summary(sink, time.perf_counter() - started)

    def _summary(self, sink: ShardSink, wall: float) -> dict[str, Any]:
        """This rank's figures (returned and logged): samples, bytes, encoder time, prompts per forward, failures."""
        stats = {
            "rank": self.rank,
            "wall_seconds": wall,
            "forward_seconds": self.forward_seconds,
            "prompts_encoded": self.prompts_encoded,
            "prompts_per_forward": self.prompts_encoded / max(self.forwards, 1),
            "samples_written": sink.written_samples,
            "bytes_written": sink.written_bytes,
            "failed": dict(self.failures_by_kind),
        }
        log.info(
            "rank done: %d samples, %.1f MB in %.1fs (%.2f samples/s), encoder %.1fs, %.2f prompts per forward "
            "(--batch_size %d); failed %s",
            sink.written_samples,
            sink.written_bytes / 1e6,
            wall,
            sink.written_samples / wall if wall else 0.0,
            self.forward_seconds,
            stats["prompts_per_forward"],
            self.config.batch_size,
            dict(self.failures_by_kind) or "none",
        )
        return stats

    def _fail(self, sink: ShardSink, failure: Failure, bar: tqdm) -> None:
        log.warning("line %d failed (%s): %s", failure.line, failure.kind, failure.reason)
        self.failures_by_kind[failure.kind] += 1
        sink.add_failure(failure)
        bar.update(1)

    def _encode(self, batch: list, entries: dict[int, _Entry], sink: ShardSink, bar: tqdm) -> None:
        live = [(sid, v, p) for sid, v, p in batch if not entries[sid].failed]
        if not live:
            return self._settle(batch, entries, sink, bar)
        t0 = time.perf_counter()
        self.forwards += 1
        self.prompts_encoded += len(live)
        try:
            outputs = self.encoder.encode([p for _, _, p in live], self.builder.drop_index)
        except Exception as exc:  # retry one by one so a single bad prompt fails only its sample
            log.warning("batch of %d prompts failed (%s); retrying one by one", len(live), exc)
            outputs = []
            for sid, _, p in live:
                try:
                    outputs.append(self.encoder.encode([p], self.builder.drop_index)[0])
                except Exception as one_exc:
                    outputs.append(None)
                    entry = entries[sid]
                    if not entry.failed:
                        entry.failed = True
                        s = entry.sample
                        self._fail(sink, Failure(s.meta["input"], s.line, "encode_error", str(one_exc)), bar)
        self.forward_seconds += time.perf_counter() - t0
        for (sid, variant, inputs), out in zip(live, outputs, strict=True):
            if out is not None:  # off the accelerator: finished samples wait in the writer's queue
                rows, entry = self.family.stored_embedding(out, inputs)
                entries[sid].embeddings[variant] = rows.to("cpu")
                if entry is not None:
                    entries[sid].sample.variant_entries[variant] = entry
        self._settle(batch, entries, sink, bar)

    def _settle(self, batch: list, entries: dict[int, _Entry], sink: ShardSink, bar: tqdm) -> None:
        for sid, _, _ in batch:
            entry = entries[sid]
            entry.remaining -= 1
            if entry.remaining == 0:
                del entries[sid]
                if not entry.failed:
                    sink.add_sample(entry.sample, entry.embeddings)
                    bar.update(1)

    # ---- end of run (rank 0) ---------------------------------------------------------------
    def finish(self) -> int:
        records = commits.read_commits(self.store)
        summary = commits.summarize(records)
        has_t2i = any(c.shard and c.shard["num_sources"] == 0 for c in records)
        null_url = None
        if has_t2i and self.encoder is not None:
            inputs = self.builder.t2i(self.family.null_text)
            null, _ = self.family.stored_embedding(self.encoder.encode([inputs], self.builder.drop_index)[0], inputs)
            self.store.write_bytes(NULL_EMBEDDING, embedding_to_npy(null))
            null_url = NULL_EMBEDDING
        base = new_manifest(
            self.task, self._model_identity(), self.config.prompt_style, self._drop_index(), self.family.name,
            self.family.shard_format_version,
        )  # fmt: skip
        extra = {
            "null_embedding": null_url,
            "embeddings": not self.config.skip_embeddings,
            "inverse": self.inverse,
            "t2i_mode": self.config.t2i_mode,
            "image_sample_size": self.config.crop_scale,
            "train_copy_size": self.config.train_copy_size,
            "input": self.config.jsonl_path,
            "world_size": self.world,
            **self._fixed_conditions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.taskdir.finish(base, extra)
        print(json.dumps({"task": self.task, "output": self.config.output_dir, **summary}, ensure_ascii=False))
        log.info(
            "task %s: %d ok, %d failed %s; manifest %s",
            self.task,
            summary["ok"],
            summary["failed"],
            summary["failed_by_reason"],
            self.store.url("manifest.json"),
        )
        return commits.failure_exit_code(
            f"task {self.task}", summary["ok"], summary["failed"], self.config.max_failure_ratio,
            self.store.url(commits.FAILURES),
        )  # fmt: skip

    def identity(self) -> dict[str, Any]:
        """What the shards are made from: the input (URL, size, digest of its start) and every output-changing flag."""
        config = self.config
        return {
            "input": config.jsonl_path,
            **input_fingerprint(config.jsonl_path, self.storage_options),
            "family": self.family.name,
            "model_config_sha256": None if config.skip_embeddings else self.family.encoder_digest(config.model_path),
            "prompt_style": config.prompt_style,
            "t2i_mode": config.t2i_mode,
            "inverse": self.inverse,
            "skip_embeddings": config.skip_embeddings,
            "image_sample_size": config.crop_scale,
            # only when set: a run started before the flag existed resumes as before
            **({"train_copy_size": config.train_copy_size} if config.train_copy_size else {}),
            "columns": [config.source_column, config.target_column],
            **self._fixed_conditions(),
        }

    def _fixed_conditions(self) -> dict[str, Any]:
        """A family whose conditions are sized at extraction records the resolution (identity and manifest)."""
        if self.builder is None or not self.builder.fixed_conditions:
            return {}
        return {"condition_resolution": self.config.condition_resolution}

    def _model_identity(self) -> dict[str, Any]:
        hidden = self.encoder.hidden_size if self.encoder else None
        if hidden is None:
            hidden = self.family.encoder_hidden_size(self.config.model_path)
        return {
            "path": self.config.model_path,
            "config_sha256": self.family.encoder_digest(self.config.model_path),
            "hidden_size": hidden,
            "compute_dtype": str(self.encoder.dtype).replace("torch.", "") if self.encoder else None,
        }

    def _drop_index(self) -> dict[str, int]:
        return self.builder.drop_index if self.builder else {}
