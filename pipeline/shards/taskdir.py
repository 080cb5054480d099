"""A task directory being written: the one session every writer of shards goes through.

Extraction (one writer per rank), convert-legacy (one per input JSONL) and reshard
(one for the source task) all write the same way: the run's identity is checked
(a rerun of the same command resumes, other input or flags are refused), the
shards a killed run left half-written are removed, each writer gets its own
shard sequence and commit records (:meth:`open_writer`), and at the end the
failures files and the manifest are built from every commit record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.shards import commits
from pipeline.shards.format import MANIFEST
from pipeline.shards.lease import RankLease
from pipeline.shards.storage import Store
from pipeline.shards.writer import ShardSink


class TaskDirectory:
    """One task directory: its store, its commit records, and the session steps around its shard writers.

    ``identity`` (what the shards are made from) makes the directory resumable; a
    directory of another identity is refused with ``hint`` (ValueError). A task
    that records no identity (none given, or written by an older version) is
    refused too unless ``adopt_unrecorded`` (extraction resumes its older runs).
    """

    def __init__(
        self,
        output_url: str,
        storage_options: dict | None,
        identity: dict[str, Any] | None,
        hint: str,
        adopt_unrecorded: bool = False,
    ):
        self.url = output_url
        self.store = Store(output_url, storage_options)
        resumable = identity is not None and (adopt_unrecorded or self.store.exists(commits.IDENTITY))
        if not resumable and (self.store.exists(MANIFEST) or self.store.listdir(commits.PROGRESS)):
            raise UserError(f"{output_url} already holds a task; choose an empty output directory")
        if identity is not None:
            commits.check_identity(self.store, identity, hint)
        self.commits: list[commits.Commit] = []

    def lease(self, writer: int) -> RankLease:
        """Writer ``writer``'s lease on this directory: a second live writer of it is refused (:class:`LeaseHeld`)
        before it could remove the first one's published but uncommitted shards as orphans. Release it at the end."""
        return RankLease(self.store, writer, path=commits.lease_file(writer))

    def load_commits(self) -> list[commits.Commit]:
        """The commit records as they are now (after this writer holds its lease, where it takes one)."""
        self.commits = commits.read_commits(self.store)
        return self.commits

    def remove_orphans(self, owned: Callable[[int], bool]) -> None:
        """Remove the half-written shards of the writers ``owned`` says are this process's to clean."""
        commits.remove_orphans(self.store, self.commits, owned)

    def done_lines(self, writer: int | None = None) -> np.ndarray:
        """Input lines (or samples) already committed: by any writer, or by ``writer`` alone."""
        records = self.commits if writer is None else [c for c in self.commits if c.rank == writer]
        return commits.done_lines(records)

    def open_writer(self, writer: int, max_samples: int, max_bytes: int, **sink_options: Any) -> ShardSink:
        """Writer ``writer``'s shard sink, continuing its shard sequence and commit records."""
        progress = commits.ProgressLog(self.store, writer, self.commits)
        return ShardSink(self.store, progress, writer, max_samples, max_bytes, **sink_options)

    def finish(self, base: dict[str, Any], extra: dict[str, Any], by_rank: bool = False) -> dict[str, Any]:
        """The failures files and the manifest, from every commit record (this run's and earlier ones)."""
        records = commits.read_commits(self.store)
        commits.write_failures_files(self.store, records, by_rank=by_rank)
        manifest = commits.build_manifest(self.store, base, records, extra, by_rank=by_rank)
        commits.write_manifest(self.store, manifest)
        return manifest
