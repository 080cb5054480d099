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

from pipeline.shards import commits
from pipeline.shards.format import NULL_EMBEDDING
from pipeline.shards.taskdir import TaskDirectory
from pipeline.shards.writer import Failure, PreparedSample, ShardSink


class TaskWriter(TaskDirectory):
    """A task directory written from existing samples, one input part at a time (see :class:`TaskDirectory`).

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
        super().__init__(
            output_url,
            storage_options,
            identity,
            "Rerun with the same input and flags to resume, or choose an empty folder.",
        )
        self.max_samples, self.max_bytes = max_samples_per_shard, max_shard_bytes
        self.sink: ShardSink | None = None
        self._lease = self.lease(0)  # one process writes every part: a second run is refused before it cleans up
        try:
            self.load_commits()
            self.remove_orphans(lambda part: True)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the directory's lease back (at the end, or when the run fails)."""
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def open_part(self, part: int) -> np.ndarray:
        """Start writing input part ``part``; returns the mask of its lines already committed."""
        self.close_part()
        self.sink = self.open_writer(part, self.max_samples, self.max_bytes)
        return self.done_lines(part)

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
        return commits.summarize([c for c in commits.read_commits(self.store) if c.rank == part], by_rank=True)

    def close(self, base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """Flush the open part; write the manifest from every commit record (of this run and earlier ones)."""
        self.close_part()
        extra = {**extra, "null_embedding": NULL_EMBEDDING if self.has_null_embedding() else None}
        try:
            return self.finish(base, extra, by_rank=True)
        finally:
            self.release()
