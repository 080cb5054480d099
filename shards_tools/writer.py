"""Writing a task directory from existing samples (conversion, resharding), with extraction's writer.

Each input part (one input JSONL for a conversion, the whole source task for a
reshard) writes like one extraction rank: its own shard sequence, commit
records and failures file.  So an interrupted conversion resumes exactly as
extraction does: committed lines are skipped, orphan shards removed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.shards import commits as prog
from pipeline.shards.format import MANIFEST, NULL_EMBEDDING
from pipeline.shards.storage import Store
from pipeline.shards.writer import Failure, PreparedSample, ShardSink


class TaskWriter:
    """Shards, commit records, failures files and manifest of one task directory being written.

    ``identity`` (what is being converted) makes the directory resumable: a
    rerun with the same identity continues; another identity, or a directory
    written by something else, is refused.  Without it the directory must be new.
    """

    def __init__(
        self,
        output_url: str,
        storage_options: dict | None,
        max_samples_per_shard: int,
        max_shard_bytes: int = 1 << 30,
        identity: dict[str, Any] | None = None,
    ):
        self.url = output_url
        self.store = Store(output_url, storage_options)
        self.max_samples, self.max_bytes = max_samples_per_shard, max_shard_bytes
        resumable = identity is not None and self.store.exists(prog.IDENTITY)
        if not resumable and (self.store.exists(MANIFEST) or self.store.listdir(prog.PROGRESS)):
            raise FileExistsError(f"{output_url} already holds a task; choose an empty output directory")
        if identity is not None:
            try:
                prog.check_identity(
                    self.store, identity, "Rerun with the same input and flags to resume, or choose an empty folder."
                )
            except ValueError as exc:
                raise FileExistsError(str(exc)) from None
        self.commits = prog.read_commits(self.store)
        prog.remove_orphans(self.store, self.commits, lambda rank: True)
        self.sink: ShardSink | None = None

    def open_part(self, part: int) -> np.ndarray:
        """Start writing input part ``part``; returns the mask of its lines already committed."""
        self.close_part()
        progress = prog.ProgressLog(self.store, part, self.commits)
        self.sink = ShardSink(self.store, progress, part, self.max_samples, self.max_bytes)
        return prog.done_lines([c for c in self.commits if c.rank == part])

    def close_part(self) -> None:
        if self.sink is not None:
            sink, self.sink = self.sink, None
            sink.close()

    def add(self, sample: PreparedSample, embeddings: dict[str, torch.Tensor | bytes]) -> None:
        self.sink.add_sample(sample, embeddings)

    def fail(self, failure: Failure) -> None:
        self.sink.add_failure(failure)

    def has_null_embedding(self) -> bool:
        return self.store.exists(NULL_EMBEDDING)

    def write_null_embedding(self, npy: bytes) -> None:
        self.store.write_bytes(NULL_EMBEDDING, npy)

    def part_summary(self, part: int) -> dict[str, Any]:
        """ok / failed counts of one input part, from its commit records (this run's and earlier ones)."""
        return prog.summarize([c for c in prog.read_commits(self.store) if c.rank == part], by_rank=True)

    def close(self, base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """Flush the open part; write the manifest from every commit record (of this run and earlier ones)."""
        self.close_part()
        extra = {**extra, "null_embedding": NULL_EMBEDDING if self.has_null_embedding() else None}
        commits = prog.read_commits(self.store)
        prog.write_failures_files(self.store, commits, by_rank=True)
        manifest = prog.build_manifest(self.store, base, commits, extra, by_rank=True)
        prog.write_manifest(self.store, manifest)
        return manifest
