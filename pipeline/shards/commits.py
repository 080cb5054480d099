"""Resume records, the failures file and manifest assembly for one task directory.

After each shard is published, its rank writes a commit record
``_progress/rank-{r:05d}/{seq:06d}.json`` naming the shard, the input lines in
it and the failures seen since the previous commit.  The commit records are the
truth: a line is done when a record lists it in a shard or with a permanent
failure, shards no record names are orphans of a killed run and are deleted,
and ``_failures/rank-{r}.jsonl`` and ``manifest.json`` are written from the
records at the end.  So a run killed at any moment and started again ends with
every input line exactly once in a shard or in the failures file.

Failures of a transient kind (a server down, an encoder out of memory) do not
make their line done: the rerun tries it again, and a line written later, or
failed again, no longer counts its earlier failure.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.shards.format import DEFAULT_FAMILY, MANIFEST, SOURCE_COUNTS, add_totals, source_dir
from pipeline.shards.storage import Store

log = logging.getLogger(__name__)

PROGRESS = "_progress"
FAILURES = "_failures"


IDENTITY = f"{PROGRESS}/identity.json"
IDENTITY_DEFAULTS = {"family": DEFAULT_FAMILY}  # what a key an older identity lacks stood for


def check_identity(store: Store, identity: dict[str, Any], fresh_hint: str) -> None:
    """Record what this task directory is made from on the first run; refuse a rerun made from something else.

    Without it a rerun with another input or other flags would find its lines
    "done" and describe the new input over the old samples.
    """
    if not store.exists(IDENTITY):
        store.write_json(IDENTITY, identity)
        return
    older = {k: v for k, v in IDENTITY_DEFAULTS.items() if k in identity}  # keys an older version did not record
    previous = {**older, **store.read_json(IDENTITY)}
    changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
    if changed:
        diff = "; ".join(f"{k}: {previous.get(k)!r} then, {identity.get(k)!r} now" for k in changed)
        raise UserError(f"{store.root} was written from other input or flags ({diff}). {fresh_hint}")


def lease_file(rank: int) -> str:
    """Where rank ``rank`` of an extraction holds its :class:`~pipeline.shards.lease.RankLease`."""
    return f"{PROGRESS}/lease-rank-{rank:05d}.json"


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


# failure kinds a rerun tries again: the input may be fine and the cause gone (network, memory, a bug fixed)
TRANSIENT_KINDS = frozenset({"fetch_error", "encode_error", "prepare_error"})


def done_lines(commits: list[Commit]) -> np.ndarray:
    """Boolean mask over line numbers already in a shard or failed for good (transient failures are retried)."""
    numbers = [n for c in commits for n in c.lines]
    numbers += [f["line"] for c in commits for f in c.failures if f["kind"] not in TRANSIENT_KINDS]
    mask = np.zeros(max(numbers, default=-1) + 1, dtype=bool)
    mask[numbers] = True
    return mask


def standing_failures(commits: list[Commit], by_rank: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """(recording rank, failure) for each failed line not written since; one per line, a permanent one first.

    Lines are keyed by number (one input file, any rank) or, with ``by_rank``,
    by (rank, number) when each rank reads its own file (conversion).
    """

    def key(rank: int, line: int):
        return (rank, line) if by_rank else line

    written = {key(c.rank, n) for c in commits for n in c.lines}
    chosen: dict[Any, tuple[int, dict[str, Any]]] = {}
    for commit in commits:
        for failure in commit.failures:
            k = key(commit.rank, failure["line"])
            if k in written:
                continue
            previous = chosen.get(k)
            if previous is None or previous[1]["kind"] in TRANSIENT_KINDS:
                chosen[k] = (commit.rank, failure)
    return list(chosen.values())


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
    """Writes this rank's commit records (each lists its shard's lines and the failures since the last one)."""

    def __init__(self, store: Store, rank: int, commits: list[Commit]):
        self.store = store
        self.rank = rank
        self.next_seq = max((c.seq for c in commits if c.rank == rank), default=-1) + 1

    def reserve_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def commit(self, commit: Commit) -> None:
        """Record a published shard (or failures only); the record makes its lines done."""
        self.store.write_json(f"{rank_dir(self.rank)}/{commit.seq:06d}.json", commit.to_json())


def write_failures_files(store: Store, commits: list[Commit], by_rank: bool = False) -> None:
    """``_failures/rank-{r}.jsonl`` for every rank from the commit records (the final step; each file once)."""
    per_rank: dict[int, list[dict[str, Any]]] = {}
    for rank, failure in standing_failures(commits, by_rank):
        per_rank.setdefault(rank, []).append(failure)
    for name in store.listdir(FAILURES):
        if name.startswith("rank-") and name.endswith(".jsonl") and _rank_of(name) not in per_rank:
            store.delete(f"{FAILURES}/{name}")  # every failure it held was retried and written since
    for rank, failures in sorted(per_rank.items()):
        failures.sort(key=lambda f: (str(f.get("file")), f["line"]))
        body = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures)
        store.write_bytes(failures_file(rank), body.encode("utf-8"))


def summarize(commits: list[Commit], by_rank: bool = False) -> dict[str, Any]:
    """ok / failed counts of samples (per reason) over all commits; failures superseded by a retry do not count."""
    ok = sum(len(c.lines) for c in commits)
    reasons: Counter = Counter()
    for _, failure in standing_failures(commits, by_rank):  # a failure counts the samples it cost
        reasons[failure["kind"]] += max(1, int(failure.get("samples") or 1))
    return {"ok": ok, "failed": sum(reasons.values()), "failed_by_reason": dict(sorted(reasons.items()))}


def build_manifest(
    store: Store, base: dict[str, Any], commits: list[Commit], extra: dict[str, Any], by_rank: bool = False
) -> dict[str, Any]:
    """Manifest from the commit records; written last and atomically by the caller."""
    manifest = dict(base)
    manifest["shards"] = [c.shard for c in commits if c.shard]
    manifest["shards"].sort(key=lambda s: s["url"])
    manifest["variants"] = sorted({v for c in commits for v in c.variants})
    summary = summarize(commits, by_rank)
    manifest["samples"] = summary["ok"]
    manifest["failures"] = summary["failed"]
    manifest["failures_by_reason"] = summary["failed_by_reason"]
    manifest.update(extra)
    add_totals(manifest)
    return manifest


def write_manifest(store: Store, manifest: dict[str, Any]) -> None:
    store.write_json(MANIFEST, manifest)


def failure_exit_code(what: str, ok: int, failed: int, max_ratio: float, failures_at: str) -> int:
    """The one failure policy of the writers (extraction, convert-legacy, reshard): exit code 1 when nothing was
    written or more than ``max_ratio`` of the inputs failed (said in the log with where the failures are), else 0."""
    total = ok + failed
    if ok == 0:
        log.error("%s: nothing could be written (%d input(s) failed); see %s", what, failed, failures_at)
        return 1
    if total and failed / total > max_ratio:
        log.error(
            "%s: %.1f%% of the inputs failed (%d of %d), above --max_failure_ratio %.1f%%; see %s",
            what, 100 * failed / total, failed, total, 100 * max_ratio, failures_at,
        )  # fmt: skip
        return 1
    return 0
