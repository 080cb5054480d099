"""Background shard writing: completed samples → one rolling tar per source count → publish → commit.

Runs in its own thread behind a bounded queue so the encoder never waits on
tar assembly or uploads, while memory stays bounded by the queue size and one
open shard per source count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.shards.commits import Commit, ProgressLog
from pipeline.shards.format import (
    VARIANTS,
    TarShardWriter,
    embedding_to_npy,
    index_name,
    npy_to_embedding,
    sample_members,
    shard_name,
)
from pipeline.shards.lease import pid_alive
from pipeline.shards.storage import Store

log = logging.getLogger(__name__)

FAILURES_PER_COMMIT = 1000
_STOP = object()


@dataclass
class Failure:
    """A line that goes to ``_failures/``: where, why, and the line itself."""

    file: str
    line: int
    kind: str
    reason: str
    field: str | None = None
    text: str = ""
    samples: int = 1  # how many samples it costs (the rest of a truncated shard: all it still held)

    def to_json(self) -> dict[str, Any]:
        """As JSON values that always encode as UTF-8 (a bad line's text may hold undecodable bytes); ``samples``
        only when the failure costs more than one."""
        value = {k: _encodable(v) if isinstance(v, str) else v for k, v in dataclasses.asdict(self).items()}
        if value["samples"] == 1:
            del value["samples"]
        return value


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class PreparedSample:
    """Everything the shard needs except the embeddings, plus the prompts to encode."""

    key: str
    line: int
    num_sources: int
    meta: dict[str, Any]
    images: dict[str, tuple[str, bytes]]  # role -> (ext, original bytes)
    # (variant, encoder inputs) still to encode; extraction fills it, the writer ignores it
    prompts: list[tuple[str, Any]] = field(default_factory=list)
    # variant -> its entry in the json's "variants" when the model family records more than the rows' shape
    variant_entries: dict[str, Any] = field(default_factory=dict)


@dataclass
class _OpenShard:
    seq: int
    url: str
    writer: TarShardWriter
    lines: list[int] = field(default_factory=list)
    variants: set[str] = field(default_factory=set)


def _spool_dir(store: Store, rank: int, tmp_dir: str | None) -> str:
    """This run's local folder for shards being assembled; removes those a killed run of this task and rank left.

    Named ``extract-{task digest}-r{rank}-p{pid}-…`` so a rerun recognises them
    (up to 4 × ``--max_shard_bytes`` each) and leaves live runs' folders alone.
    """
    prefix = f"extract-{hashlib.sha256(store.root.encode()).hexdigest()[:12]}-r{rank}-p"
    parent = tmp_dir or tempfile.gettempdir()
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        # any task's: a killed run of another output would otherwise leave its partial tars until it is rerun
        match = _SPOOL.match(name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            log.info("removed %s, left by a killed run", os.path.join(parent, name))
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=tmp_dir)


_SPOOL = re.compile(r"^extract-[0-9a-f]{12}-r\d+-p(\d+)-")


class ShardSink:
    """Owns this rank's open shards; every call from the main thread only enqueues."""

    def __init__(
        self,
        store: Store,
        progress: ProgressLog,
        rank: int,
        max_samples_per_shard: int,
        max_shard_bytes: int,
        queue_size: int = 32,
        tmp_dir: str | None = None,
        max_sequence_length: int | None = None,
    ):
        self.store, self.progress, self.rank = store, progress, rank
        self.max_sequence_length = max_sequence_length  # None: embeddings of any length (resharding, conversion)
        self.max_samples, self.max_bytes = max_samples_per_shard, max_shard_bytes
        self.tmp_dir = _spool_dir(store, rank, tmp_dir)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.open: dict[int, _OpenShard] = {}
        self.failures: list[dict] = []
        self.error: BaseException | None = None
        self.written_samples = 0
        self.written_bytes = 0
        self._thread = threading.Thread(target=self._run, name=f"shard-writer-{rank}", daemon=True)
        self._thread.start()

    # ---- main thread -------------------------------------------------------------------------
    def add_sample(self, sample: PreparedSample, embeddings: dict[str, torch.Tensor | bytes]) -> None:
        self._put(("sample", sample, embeddings))

    def add_failure(self, failure: Failure) -> None:
        self._put(("failure", failure, None))

    def close(self) -> None:
        """Flush open shards and pending failures, wait for the uploads, re-raise a writer error."""
        self.queue.put(_STOP)  # even after a writer error: the thread drains until it sees this
        self._thread.join()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # what is left was never published (a writer error)
        if self.error is not None:
            raise RuntimeError(f"shard writer failed: {self.error}") from self.error

    def _put(self, item) -> None:
        if self.error is not None:
            raise RuntimeError(f"shard writer failed: {self.error}") from self.error
        self.queue.put(item)

    # ---- writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        try:
            while True:
                item = self.queue.get()
                if item is _STOP:
                    stopping = True  # nothing more will come: an error below must not wait for another
                    for n in sorted(self.open):
                        self._publish(n)
                    if self.failures:
                        self._commit(None, [], set())
                    return
                kind, payload, embeddings = item
                if kind == "failure":
                    self.failures.append(payload.to_json())
                    if len(self.failures) >= FAILURES_PER_COMMIT:
                        self._commit(None, [], set())
                else:
                    self._write(payload, embeddings)
        except BaseException as exc:  # surfaced to the main thread on its next call
            log.exception("shard writer stopped")
            self.error = exc
            while not stopping:  # keep draining so the producer never blocks, until its stop marker
                stopping = self.queue.get() is _STOP

    def _write(self, sample: PreparedSample, embeddings: dict[str, torch.Tensor]) -> None:
        embeddings = {v: embeddings[v] for v in VARIANTS if v in embeddings}  # fixed member order
        for variant, tensor in embeddings.items():
            problem = self._unusable(variant, tensor)
            if problem is not None:
                kind, reason = problem
                log.warning("%s line %s: %s; sample not written", sample.meta.get("input"), sample.line, reason)
                failure = Failure(str(sample.meta.get("input", "")), sample.line, kind, reason, variant)
                self.failures.append(failure.to_json())
                return
        # tensors are encoded here; ready .npy bytes (resharding, conversion) are stored as they are
        npys = {v: t if isinstance(t, bytes) else embedding_to_npy(t) for v, t in embeddings.items()}
        shapes = {
            v: list(npy_to_embedding(t).shape) if isinstance(t, bytes) else list(t.shape) for v, t in embeddings.items()
        }
        recorded = sample.meta.get("variants") or {}  # a copied sample (reshard) keeps a v2 entry's slot layout
        sample.meta["variants"] = {
            v: sample.variant_entries.get(v) or (recorded[v] if isinstance(recorded.get(v), dict) else shape)
            for v, shape in shapes.items()
        }
        members = sample_members(sample.meta, sample.images, npys)
        shard = self.open.get(sample.num_sources)
        if shard is None:
            seq = self.progress.reserve_seq()
            url = shard_name(sample.num_sources, self.rank, seq)
            local = os.path.join(self.tmp_dir, url.replace("/", "_"))
            shard = self.open[sample.num_sources] = _OpenShard(seq, url, TarShardWriter(local))
        shard.writer.add(sample.key, members)
        shard.lines.append(sample.line)
        shard.variants.update(embeddings)
        if len(shard.writer) >= self.max_samples or shard.writer.bytes_written >= self.max_bytes:
            self._publish(sample.num_sources)

    def _unusable(self, variant: str, tensor) -> tuple[str, str] | None:
        """(failure kind, reason) of an embedding that must not be written: NaN/Inf (e.g. fp16 overflow) would
        poison training; a prompt longer than ``max_sequence_length`` tokens would stop every run that draws it."""
        if isinstance(tensor, bytes):
            return None
        if self.max_sequence_length is not None and tensor.shape[0] > self.max_sequence_length:
            return "prompt_too_long", (
                f"embedding {variant} has {tensor.shape[0]} tokens, over --max_sequence_length "
                f"{self.max_sequence_length}"
            )
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            return "non_finite_embedding", f"embedding {variant} has {bad} non-finite value(s) of {tensor.numel()}"
        return None

    def _publish(self, num_sources: int) -> None:
        shard = self.open.pop(num_sources)
        size, digest = shard.writer.close()
        index_body = json.dumps({"shard": shard.url, "samples": shard.writer.index}).encode("utf-8")
        self.store.put_file(shard.writer.local_path, shard.url)
        self.store.write_bytes(index_name(shard.url), index_body)
        stats = {
            "url": shard.url,
            "num_sources": num_sources,
            "samples": len(shard.writer),
            "bytes": size,
            "sha256": digest,
            "index": index_name(shard.url),
            "index_sha256": hashlib.sha256(index_body).hexdigest(),
        }
        self._commit(stats, shard.lines, shard.variants, seq=shard.seq)
        self.written_samples += len(shard.writer)
        self.written_bytes += size
        if os.path.exists(shard.writer.local_path):
            os.remove(shard.writer.local_path)
        log.info("published %s (%d samples, %.1f MB)", shard.url, len(shard.writer), size / 1e6)

    def _commit(self, stats: dict | None, lines: list[int], variants: set[str], seq: int | None = None) -> None:
        failures, self.failures = self.failures, []
        seq = self.progress.reserve_seq() if seq is None else seq
        self.progress.commit(Commit(self.rank, seq, stats, sorted(lines), failures, sorted(variants)))
