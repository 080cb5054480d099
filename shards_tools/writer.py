"""Writing a new task directory from existing samples (conversion, resharding), with extraction's writer."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.shards import commits as prog
from pipeline.shards.format import MANIFEST, NULL_EMBEDDING
from pipeline.shards.storage import Store
from pipeline.shards.writer import Failure, PreparedSample, ShardSink


class TaskWriter:
    """Shards, commit records, failures file and manifest of one new task directory."""

    def __init__(
        self, output_url: str, storage_options: dict | None, max_samples_per_shard: int, max_shard_bytes: int = 1 << 30
    ):
        self.store = Store(output_url, storage_options)
        if self.store.exists(MANIFEST) or self.store.listdir(prog.PROGRESS):
            raise FileExistsError(f"{output_url} already holds a task; choose an empty output directory")
        self.progress = prog.ProgressLog(self.store, 0, [])
        self.sink = ShardSink(self.store, self.progress, 0, max_samples_per_shard, max_shard_bytes)

    def add(self, sample: PreparedSample, embeddings: dict[str, torch.Tensor | bytes]) -> None:
        self.sink.add_sample(sample, embeddings)

    def fail(self, failure: Failure) -> None:
        self.sink.add_failure(failure)

    def close(self, base: dict[str, Any], extra: dict[str, Any], null_embedding: bytes | None) -> dict[str, Any]:
        self.sink.close()
        if null_embedding is not None:
            self.store.write_bytes(NULL_EMBEDDING, null_embedding)
        extra = {**extra, "null_embedding": NULL_EMBEDDING if null_embedding is not None else None}
        manifest = prog.build_manifest(self.store, base, prog.read_commits(self.store), extra)
        prog.write_manifest(self.store, manifest)
        return manifest
