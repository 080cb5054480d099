"""Resume records, the failures file and manifest assembly for one task directory.

After each shard is published, its rank writes a commit record
``_progress/rank-{r:05d}/{seq:06d}.json`` naming the shard, the input lines in
it and the failures seen since the previous commit.  The commit records are the
truth: a line is done when a record lists it, shards no record names are
orphans of a killed run and are deleted, and ``_failures/rank-{r}.jsonl`` and
``manifest.json`` are rebuilt from the records.  So a run killed at any moment
and started again ends with every input line exactly once in a shard or in the
failures file.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.shards.format import MANIFEST, SOURCE_COUNTS, add_totals, source_dir
from pipeline.shards.storage import Store

log = logging.getLogger(__name__)

PROGRESS = "_progress"
FAILURES = "_failures"


def rank_dir(rank: int) -> str:
    return f"{PROGRESS}/rank-{rank:05d}"


def failures_file(rank: int) -> str:
    return f"{FAILURES}/rank-{rank}.jsonl"


@dataclass
class Commit:
    rank: int
    seq: int
    shard: dict[str, Any] | None
    lines: list[int]
    failures: list[dict[str, Any]]
    variants: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "seq": self.seq,
            "shard": self.shard,
            "lines": self.lines,
            "failures": self.failures,
            "variants": self.variants,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Commit:
        return cls(
            value["rank"], value["seq"], value["shard"], value["lines"], value["failures"], value.get("variants", [])
        )


def read_commits(store: Store) -> list[Commit]:
    """Every commit record of every rank, ordered by (rank, seq)."""
    commits = []
    for rank_name in store.listdir(PROGRESS):
        if not rank_name.startswith("rank-"):
            continue
        for name in store.listdir(f"{PROGRESS}/{rank_name}"):
            if name.endswith(".json"):
                commits.append(Commit.from_json(store.read_json(f"{PROGRESS}/{rank_name}/{name}")))
    return sorted(commits, key=lambda c: (c.rank, c.seq))


def done_lines(commits: list[Commit]) -> np.ndarray:
    """Boolean mask over line numbers that are already in a shard or in the failures file."""
    numbers = [n for c in commits for n in c.lines] + [f["line"] for c in commits for f in c.failures]
    mask = np.zeros(max(numbers, default=-1) + 1, dtype=bool)
    mask[numbers] = True
    return mask


def remove_orphans(store: Store, commits: list[Commit], owns: Callable[[int], bool]) -> list[str]:
    """Delete shards (and indexes) of ranks ``owns`` accepts that no commit names: leftovers of a killed run."""
    committed = {c.shard["url"] for c in commits if c.shard}
    removed = []
    for folder in map(source_dir, SOURCE_COUNTS):
        for name in store.listdir(folder):
            rel = f"{folder}/{name}"
            prefix = name.split("-", 1)[0]
            if not prefix.isdigit() or not owns(int(prefix)):
                continue
            shard = rel if name.endswith(".tar") else None
            if name.endswith(".index.json"):
                shard = rel[: -len(".index.json")] + ".tar"
            if ".tmp-" in name or shard is None or shard not in committed:
                store.delete(rel)
                removed.append(rel)
    for name in store.listdir(FAILURES):  # temporary files of a write cut short
        if ".tmp-" in name and name.startswith("rank-") and owns(_rank_of(name)):
            store.delete(f"{FAILURES}/{name}")
            removed.append(f"{FAILURES}/{name}")
    for rank_name in store.listdir(PROGRESS):
        if rank_name.startswith("rank-") and owns(_rank_of(rank_name)):
            for name in store.listdir(f"{PROGRESS}/{rank_name}"):
                if ".tmp-" in name:
                    store.delete(f"{PROGRESS}/{rank_name}/{name}")
                    removed.append(f"{PROGRESS}/{rank_name}/{name}")
    if removed:
        log.info("removed %d leftover file(s) of an interrupted run: %s", len(removed), ", ".join(removed[:5]))
    return removed


def _rank_of(name: str) -> int:
    """The rank in ``rank-00003``, ``rank-3.jsonl`` or ``rank-3.jsonl.tmp-…`` (-1 if none)."""
    digits = name[len("rank-") :].split(".", 1)[0]
    return int(digits) if digits.isdigit() else -1


class ProgressLog:
    """Writes this rank's commit records and keeps its failures file in step with them."""

    def __init__(self, store: Store, rank: int, commits: list[Commit]):
        self.store = store
        self.rank = rank
        mine = [c for c in commits if c.rank == rank]
        self.next_seq = max((c.seq for c in mine), default=-1) + 1
        self.failures = [f for c in mine for f in c.failures]
        self.rewrite_failures()

    def reserve_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def commit(self, commit: Commit) -> None:
        """Record a published shard (or failures only); the record makes its lines done."""
        self.store.write_json(f"{rank_dir(self.rank)}/{commit.seq:06d}.json", commit.to_json())
        if commit.failures:
            self.failures.extend(commit.failures)
            self.rewrite_failures()

    def rewrite_failures(self) -> None:
        if not self.failures and not self.store.exists(failures_file(self.rank)):
            return
        body = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in self.failures)
        self.store.write_bytes(failures_file(self.rank), body.encode("utf-8"))


def summarize(commits: list[Commit]) -> dict[str, Any]:
    """ok / failed counts (per reason) over all commits."""
    ok = sum(len(c.lines) for c in commits)
    reasons = Counter(f["kind"] for c in commits for f in c.failures)
    return {"ok": ok, "failed": sum(reasons.values()), "failed_by_reason": dict(sorted(reasons.items()))}


def build_manifest(store: Store, base: dict[str, Any], commits: list[Commit], extra: dict[str, Any]) -> dict[str, Any]:
    """Manifest from the commit records; written last and atomically by the caller."""
    manifest = dict(base)
    manifest["shards"] = [c.shard for c in commits if c.shard]
    manifest["shards"].sort(key=lambda s: s["url"])
    manifest["variants"] = sorted({v for c in commits for v in c.variants})
    summary = summarize(commits)
    manifest["samples"] = summary["ok"]
    manifest["failures"] = summary["failed"]
    manifest["failures_by_reason"] = summary["failed_by_reason"]
    manifest.update(extra)
    add_totals(manifest)
    return manifest


def write_manifest(store: Store, manifest: dict[str, Any]) -> None:
    store.write_json(MANIFEST, manifest)
