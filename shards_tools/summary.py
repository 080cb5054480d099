"""``inspect`` (one line per sample) and ``stats`` (a table per task and source count)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

from pipeline.shards.format import variant_shape
from pipeline.shards.reader import RangeReader, iter_samples, sample_meta
from pipeline.shards.storage import Store, join
from pipeline.shards.tasks import open_tasks, shard_list


def inspect_samples(url: str, storage_options: dict | None, limit: int | None) -> tuple[list[dict], list[dict]]:
    """(rows, problems): key, N, sizes, bucket, variants with shapes, instruction excerpt."""
    rows, problems = [], []
    for shard in shard_list(url, storage_options):
        try:
            for key, members in iter_samples(shard, storage_options):
                try:
                    meta = sample_meta(members)
                except (KeyError, ValueError) as exc:
                    problems.append({"shard": shard, "key": key, "problem": f"json unreadable: {exc}"})
                    continue
                rows.append(
                    {
                        "shard": shard,
                        "key": key,
                        "num_sources": meta.get("num_sources"),
                        "sizes": [s.get("size") for s in meta.get("sources", [])]
                        + [meta.get("target", {}).get("size")],
                        "bucket": meta.get("bucket"),
                        "variants": meta.get("variants", {}),
                        "instruction": meta.get("instruction") or meta.get("instruction_cn") or "",
                    }
                )
                if limit is not None and len(rows) >= limit:
                    return rows, problems
        except Exception as exc:  # a broken shard is reported, the rest is still listed
            problems.append({"shard": shard, "key": None, "problem": f"unreadable shard: {exc}"})
    return rows, problems


def format_inspect(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        sizes = " ".join("x".join(map(str, s)) if s else "?" for s in r["sizes"])
        variants = " ".join(f"{v}{tuple(variant_shape(e) or ())}" for v, e in r["variants"].items()) or "-"
        text = r["instruction"].replace("\n", " ")
        lines.append(
            f"{r['key']}  N={r['num_sources']}  [{sizes}]  bucket={r['bucket']}  {variants}  "
            f"{text[:60] + ('…' if len(text) > 60 else '')}"
        )
    return "\n".join(lines)


def task_stats(url: str, storage_options: dict | None) -> tuple[list[dict], list[dict]]:
    """Per task and N: samples, shards, bytes, aspect buckets, variants, failures (read from sample json)."""
    rows, problems = [], []
    for task in open_tasks(url, storage_options):
        if task.manifest is None:
            problems.append({"task": task.name, "shard": None, "key": None, "problem": task.error})
            continue
        store = Store(task.url, storage_options)
        failures = 0
        for name in [n for n in store.listdir("_failures") if n.endswith(".jsonl")]:  # not .tmp- leftovers
            failures += len([x for x in store.read_bytes(f"_failures/{name}").splitlines() if x.strip()])
        per_n: dict[int, dict[str, Any]] = defaultdict(
            lambda: {"samples": 0, "shards": 0, "bytes": 0, "buckets": Counter(), "variants": Counter()}
        )
        for shard in task.manifest["shards"]:
            entry = per_n[int(shard["num_sources"])]
            entry["shards"] += 1
            entry["bytes"] += shard["bytes"]
            try:
                for meta in shard_metas(task.url, shard, storage_options):
                    entry["samples"] += 1
                    entry["buckets"][json.dumps(meta["bucket"])] += 1
                    entry["variants"].update(meta.get("variants", {}).keys())
            except Exception as exc:
                problems.append({"task": task.name, "shard": shard["url"], "key": None, "problem": str(exc)})
        for n in sorted(per_n):
            e = per_n[n]
            rows.append(
                {
                    "task": task.name,
                    "num_sources": n,
                    "samples": e["samples"],
                    "shards": e["shards"],
                    "bytes": e["bytes"],
                    "aspect_buckets": len(e["buckets"]),
                    "top_buckets": [[json.loads(b), c] for b, c in e["buckets"].most_common(3)],
                    "variants": dict(sorted(e["variants"].items())),
                    "failures_recorded": failures,
                }
            )
        if not per_n:
            rows.append(
                {
                    "task": task.name,
                    "num_sources": None,
                    "samples": 0,
                    "shards": 0,
                    "bytes": 0,
                    "aspect_buckets": 0,
                    "top_buckets": [],
                    "variants": {},
                    "failures_recorded": failures,
                }
            )
    return rows, problems


def shard_metas(task_url: str, shard: dict, storage_options: dict | None):
    """Each sample's json: one small range read per sample through the shard index, else a streamed read."""
    shard_url = join(task_url, shard["url"])
    if not shard.get("index"):
        for _, members in iter_samples(shard_url, storage_options):
            yield sample_meta(members)
        return
    reader = RangeReader(storage_options)
    for entry in json.loads(reader.read(join(task_url, shard["index"])))["samples"]:
        offset, size = entry["members"]["json"]
        yield json.loads(reader.read(shard_url, offset, offset + size))


def format_stats(rows: list[dict]) -> str:
    head = f"{'task':<20} {'N':>2} {'samples':>8} {'shards':>6} {'MB':>9} {'buckets':>7}  variants  (failures)"
    lines = [head, "-" * len(head)]
    for r in rows:
        variants = ",".join(r["variants"]) or "-"
        lines.append(
            f"{r['task']:<20} {r['num_sources'] if r['num_sources'] is not None else '-':>2} "
            f"{r['samples']:>8} {r['shards']:>6} {r['bytes'] / 1e6:>9.1f} {r['aspect_buckets']:>7}  "
            f"{variants}  ({r['failures_recorded']})"
        )
    return "\n".join(lines)
