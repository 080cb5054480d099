"""``reshard``: copy a task into shards of another size, member bytes unchanged, optionally adding training copies.

A sample that cannot be copied as it is stored goes to ``_failures/`` and the copy
goes on; a truncated shard's failure counts every sample it still held. The
samples are numbered in the source's order, so a rerun resumes after the last
commit; the output's lease refuses a second live writer.
"""

from __future__ import annotations

import json
import logging

from tqdm import tqdm

from pipeline.common import images as imaging
from pipeline.errors import DataError
from pipeline.shards import copies
from pipeline.shards.format import COPY_PREFIX, copy_role, unsafe_name
from pipeline.shards.reader import CheckedSample, iter_checked_samples, stored_problems
from pipeline.shards.storage import Store
from pipeline.shards.tasks import open_task
from pipeline.shards.writer import Failure, PreparedSample
from shards_tools.writer import TaskWriter

log = logging.getLogger(__name__)

RESHARD_SAMPLES, CARRIED_FAILURES = 0, 1  # the writer's parts: the copied samples, the source's failures


def reshard(
    url: str,
    output_url: str,
    storage_options: dict | None,
    max_samples_per_shard: int,
    train_copy_size: int = 0,
) -> dict:
    """Copy a task into shards of ``max_samples_per_shard`` (merging or splitting); bytes are kept as stored.

    With ``train_copy_size`` the training copies are made for that size (replacing any the
    task had), as ``extract --train_copy_size`` makes them: no re-extraction needed.  A
    sample that cannot be copied as it is stored (a member missing, a symlink, a name that
    leaves the folder, an ``.npy`` cut short, a truncated shard) goes to ``_failures/`` and
    the copy goes on.  The samples are numbered in the source's order (its manifest's shards,
    file order inside each), so a rerun of the same command resumes after the last commit.
    """
    task = open_task(url, storage_options)
    if task.manifest is None:
        raise DataError(task.error)
    identity = {
        "resharded_from": url,
        "source_shards": [[s["url"], s.get("sha256")] for s in task.manifest["shards"]],
        "max_samples_per_shard": max_samples_per_shard,
        "train_copy_size": train_copy_size,
    }
    writer = TaskWriter(output_url, storage_options, max_samples_per_shard, identity=identity)
    try:
        bar = tqdm(desc=f"reshard {task.name}", unit="sample", dynamic_ncols=True, mininterval=1.0)
        try:
            done = writer.open_part(RESHARD_SAMPLES)
            claimed = dict(zip(task.shard_urls(), (e.get("samples") for e in task.manifest["shards"]), strict=True))
            read: dict[str, int] = {}  # samples split out of each shard so far
            items = (item for shard in task.shard_urls() for item in _with_shard(shard, storage_options))
            for number, (shard_url, item) in enumerate(items):
                if item.key is not None:
                    read[shard_url] = read.get(shard_url, 0) + 1
                if number < len(done) and done[number]:
                    continue
                bar.update(1)
                result = _reshard_sample(item, shard_url, number, train_copy_size)
                if isinstance(result, Failure) and item.key is None:  # the rest of a truncated shard: all it held
                    rest = claimed.get(shard_url)
                    result.samples = max(1, rest - read.get(shard_url, 0)) if isinstance(rest, int) else 1
                if isinstance(result, Failure):
                    log.warning("%s: %s", shard_url, result.reason)
                    writer.fail(result)
                else:
                    writer.add(*result)
            carry_failures(writer, Store(url, storage_options))
        finally:
            bar.close()
            writer.close_part()
        if task.manifest.get("null_embedding"):
            writer.write_null_embedding(Store(url, storage_options).read_bytes(task.manifest["null_embedding"]))
        base, extra = resharded_manifest(task.manifest, url, train_copy_size)
        manifest = writer.close(base, extra)
        return {**manifest, "reshard": writer.part_summary(RESHARD_SAMPLES)}
    finally:
        writer.release()  # the lease, whatever happened


def carry_failures(writer: TaskWriter, source: Store) -> None:
    """The source task's own failures into the new task's, once (a rerun skips those already carried)."""
    done = writer.open_part(CARRIED_FAILURES)
    for name in [n for n in source.listdir("_failures") if n.endswith(".jsonl")]:  # not .tmp- leftovers
        for text in source.read_bytes(f"_failures/{name}").decode("utf-8").splitlines():
            entry = json.loads(text) if text.strip() else None
            line = int(entry.get("line") or 0) if entry else 0
            if entry and not (line < len(done) and done[line]):
                writer.fail(Failure(**{k: entry.get(k) for k in ("file", "line", "kind", "reason", "field", "text")}))


# what a resharded task's manifest keeps of the source's as it is, and what the writer counts anew
KEPT_KEYS = ("format", "format_version", "task", "model", "prompt_style", "drop_index", "embedding")
COUNTED_KEYS = ("shards", "totals", "samples", "failures", "failures_by_reason", "variants", "null_embedding")


def resharded_manifest(source: dict, url: str, train_copy_size: int) -> tuple[dict, dict]:
    """The new task's manifest base (the source's identity) and the source's other keys, with where it came from."""
    base = {k: source[k] for k in KEPT_KEYS if k in source}
    base.setdefault("shards", [])
    extra = {k: v for k, v in source.items() if k not in (*KEPT_KEYS, *COUNTED_KEYS)}
    extra["resharded_from"] = url
    if train_copy_size:
        extra["train_copy_size"] = train_copy_size
    return base, extra


def _with_shard(shard_url: str, storage_options: dict | None):
    for item in iter_checked_samples(shard_url, storage_options):
        yield shard_url, item


def _reshard_sample(
    item: CheckedSample, shard_url: str, number: int, train_copy_size: int
) -> tuple[PreparedSample, dict[str, bytes]] | Failure:
    """One stored sample as the writer takes it, or why it cannot be copied (as a ``_failures/`` record)."""
    where = f"sample {item.key}" if item.key is not None else "the rest of the shard"

    def failure(problems: list[str], kind: str = "bad_sample") -> Failure:
        return Failure(shard_url, number, kind, f"{where}: {'; '.join(problems)}", None, item.key or "")

    if item.key is None:
        return failure(item.problems, "unreadable_shard")
    if unsafe_name(item.key):
        return failure([f"its key {item.key!r} has {unsafe_name(item.key)}"], "unsafe_name")
    meta, problems = stored_problems(item)
    if problems:
        return failure(problems)
    try:
        images = {}
        for entry, role in [(meta["target"], "target")] + [(s, f"source{i}") for i, s in enumerate(meta["sources"])]:
            ext = entry["member"].split(".", 1)[1]
            images[role] = (ext, item.members[entry["member"]])
            if "copy" in entry:  # the training copy travels with its original
                images[copy_role(role)] = ("npy", item.members[entry["copy"]["member"]])
        if train_copy_size:
            pictures = {r: imaging.open_rgb(d) for r, (_, d) in images.items() if not r.startswith(COPY_PREFIX)}
            copies.add_train_copies(meta, images, pictures, train_copy_size)
        embeddings = {v: item.members[f"emb_{v}.npy"] for v in meta.get("variants", {})}
        sample = PreparedSample(
            key=item.key, line=number, num_sources=int(meta["num_sources"]), meta=meta, images=images
        )
    except Exception as exc:  # an image that does not decode for a training copy, a json field of the wrong type
        return failure([f"{type(exc).__name__}: {exc}"])
    return sample, embeddings
