"""``verify``: a task's manifest against its shards, member by member; every problem with shard and key."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
from PIL import Image

from pipeline.shards.format import SOURCE_COUNTS, is_forbidden_member, npy_to_image, source_dir, variant_shape
from pipeline.shards.reader import iter_checked, open_stream
from pipeline.shards.storage import Store
from pipeline.shards.tasks import open_tasks


class HashingReader(io.RawIOBase):
    """Counts and hashes every byte the tar reader pulls through it."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def drain(self) -> None:
        while chunk := self.raw.read(1 << 22):
            self.sha.update(chunk)
            self.size += len(chunk)


def _check_sample(key: str, members: dict[str, bytes], manifest: dict, n: int) -> list[str]:
    problems = []
    if "json" not in members:
        return ["no json member"]
    try:
        meta = json.loads(members["json"])
    except ValueError as exc:
        return [f"json does not decode: {exc}"]
    if meta.get("num_sources") != n:
        problems.append(f"num_sources {meta.get('num_sources')} in a src{n} shard")
    roles = [meta.get("target", {}).get("member")] + [s.get("member") for s in meta.get("sources", [])]
    for member in roles:
        if member not in members:
            problems.append(f"image member {member} missing")
            continue
        try:
            with Image.open(io.BytesIO(members[member])) as img:
                img.load()
        except Exception as exc:
            problems.append(f"{member} does not decode: {exc}")
    hidden = manifest.get("embedding", {}).get("hidden_size")
    npy_dtype = np.dtype(manifest.get("embedding", {}).get("npy_dtype", "<u2"))
    for variant, entry in meta.get("variants", {}).items():
        shape = variant_shape(entry)
        name = f"emb_{variant}.npy"
        if name not in members:
            problems.append(f"{name} missing")
            continue
        try:
            array = np.load(io.BytesIO(members[name]), allow_pickle=False)
        except Exception as exc:
            problems.append(f"{name} does not decode: {exc}")
            continue
        if array.dtype != npy_dtype or array.ndim != 2 or (hidden and array.shape[1] != hidden):
            problems.append(f"{name} is {array.dtype} {array.shape}, expected {npy_dtype} [seq, {hidden}]")
        elif list(array.shape) != shape:
            problems.append(f"{name} shape {list(array.shape)} differs from the json's {shape}")
    copies = []
    for entry in [meta.get("target", {}), *meta.get("sources", [])]:
        if "copy" not in entry:
            continue
        name = entry["copy"].get("member")
        copies.append(name)
        if name not in members:
            problems.append(f"training copy {name} missing")
            continue
        try:
            pixels = npy_to_image(members[name])
        except Exception as exc:
            problems.append(f"{name} does not decode: {exc}")
            continue
        if [pixels.shape[1], pixels.shape[0]] != list(entry["copy"].get("size", [])):
            problems.append(f"{name} is {pixels.shape[1]}x{pixels.shape[0]}, the json says {entry['copy'].get('size')}")
    extra = set(members) - {"json", *roles, *copies, *(f"emb_{v}.npy" for v in meta.get("variants", {}))}
    for name in sorted(extra):
        if not is_forbidden_member(name):
            problems.append(f"unexpected member {name}")
    return problems


def unlisted_shards(store: Store, manifest: dict) -> list[str]:
    """Shards on storage that the manifest does not list (left by a killed run, or copied in by hand)."""
    listed = {s["url"] for s in manifest["shards"]}
    return [
        f"{folder}/{name}"
        for folder in map(source_dir, SOURCE_COUNTS)
        for name in store.listdir(folder)
        if name.endswith(".tar") and f"{folder}/{name}" not in listed
    ]


def index_problems(store: Store, shard: dict) -> list[str]:
    """What is wrong with a shard's index against the manifest (nothing when it has none)."""
    if not shard.get("index"):
        return []
    try:
        index_bytes = store.read_bytes(shard["index"])
    except FileNotFoundError:
        return ["index missing"]
    problems = []
    if shard.get("index_sha256") and hashlib.sha256(index_bytes).hexdigest() != shard["index_sha256"]:
        problems.append("index sha256 differs from the manifest")
    if len(json.loads(index_bytes)["samples"]) != shard["samples"]:
        problems.append("index sample count differs from the manifest")
    return problems


def verify(url: str, storage_options: dict | None) -> tuple[dict[str, Any], list[dict]]:
    """(summary, problems) for a task directory or every task under a meta directory."""
    problems: list[dict] = []
    summary = {"tasks": 0, "shards": 0, "samples": 0}

    def report(task, shard, key, problem):
        problems.append({"task": task, "shard": shard, "key": key, "problem": problem})

    for task in open_tasks(url, storage_options):
        summary["tasks"] += 1
        if task.manifest is None:
            report(task.name, None, None, task.error)
            continue
        manifest, keys = task.manifest, {}
        store = Store(task.url, storage_options)
        for unlisted in unlisted_shards(store, manifest):
            report(task.name, unlisted, None, "shard on storage but not in the manifest")
        for shard in manifest["shards"]:
            summary["shards"] += 1
            rel, n = shard["url"], int(shard["num_sources"])
            shard_url = f"{task.url.rstrip('/')}/{rel}"
            if not store.exists(rel):
                report(task.name, rel, None, "missing")
                continue
            count, broken = 0, False
            try:
                with open_stream(shard_url, storage_options) as raw:
                    reader = HashingReader(raw)
                    for item in iter_checked(io.BufferedReader(reader, 1 << 20)):
                        if item.key is None:  # unreadable from here on (a truncated tar)
                            report(task.name, rel, None, "; ".join(item.problems))
                            broken = True
                            continue
                        count += 1
                        if item.key in keys:
                            report(task.name, rel, item.key, f"duplicate key (also in {keys[item.key]})")
                        keys[item.key] = rel
                        for problem in item.problems + _check_sample(item.key, item.members, manifest, n):
                            report(task.name, rel, item.key, problem)
                    reader.drain()
            except Exception as exc:
                report(task.name, rel, None, f"unreadable: {type(exc).__name__}: {exc}")
                continue
            if broken:
                continue
            summary["samples"] += count
            if count != shard["samples"]:
                report(task.name, rel, None, f"{count} samples, manifest says {shard['samples']}")
            if reader.size != shard["bytes"]:
                report(task.name, rel, None, f"{reader.size} bytes, manifest says {shard['bytes']}")
            if reader.sha.hexdigest() != shard["sha256"]:
                report(task.name, rel, None, "sha256 differs from the manifest")
            for problem in index_problems(store, shard):
                report(task.name, shard["index"], None, problem)
        totals = sum(s["samples"] for s in manifest["shards"])
        if manifest.get("samples") is not None and manifest["samples"] != totals:
            report(task.name, None, None, f"manifest samples {manifest['samples']} != sum over shards {totals}")
        if manifest.get("null_embedding") and not store.exists(manifest["null_embedding"]):
            report(task.name, manifest["null_embedding"], None, "null embedding missing")
    return summary, problems


def format_problems(summary: dict, problems: list[dict]) -> str:
    lines = [
        f"checked {summary['tasks']} task(s), {summary['shards']} shard(s), {summary['samples']} sample(s): "
        + ("OK" if not problems else f"{len(problems)} problem(s)")
    ]
    for p in problems:
        where = "/".join(x for x in (p["task"], p["shard"]) if x)
        lines.append(f"  {where}" + (f" [{p['key']}]" if p["key"] else "") + f": {p['problem']}")
    return "\n".join(lines)
