"""``convert-legacy`` (the original tool's JSONL + ``.pt`` output → shards) and ``reshard``."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import fsspec
import torch

from pipeline.common import images as imaging
from pipeline.extract.prepare import sample_from_images
from pipeline.extract.records import RecordError, iter_lines, parse_line
from pipeline.shards.format import embedding_to_npy, new_manifest, sample_key
from pipeline.shards.reader import iter_samples, sample_meta
from pipeline.shards.storage import Store, join, options_for
from pipeline.shards.tasks import open_task
from pipeline.shards.writer import Failure, PreparedSample
from shards_tools.writer import TaskWriter

log = logging.getLogger("shards_tools")

# the original tool's line fields → our variant names
LEGACY_FIELDS = {
    "embeddings_tensor_en": "en",
    "embeddings_tensor_cn": "cn",
    "embeddings_tensor_droptext": "drop",
    "embeddings_tensor_en_inv": "en_inv",
    "embeddings_tensor_cn_inv": "cn_inv",
    "embeddings_tensor_droptext_inv": "drop_inv",
}


def load_pt_tensor(uri: str, storage_options: dict | None) -> torch.Tensor:
    """A ``.pt`` embedding, loaded with ``weights_only=True``; ``[1, seq, hidden]`` is squeezed."""
    with fsspec.open(uri, "rb", **options_for(uri, storage_options)) as handle:
        value = torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
    if isinstance(value, dict):  # {"prompt_embeds": tensor, ...} style files
        value = next(v for v in value.values() if torch.is_tensor(v))
    if value.dim() == 3 and value.shape[0] == 1:
        value = value[0]
    if value.dim() != 2:
        raise ValueError(f"expected a [seq, hidden] tensor, got shape {tuple(value.shape)}")
    return value


def convert_legacy(meta_dir: str, output_url: str, storage_options: dict | None, max_samples_per_shard: int) -> dict:
    """Every line of every ``*.jsonl`` under ``meta_dir`` → a sample; bad lines → ``_failures/``."""
    store = Store(meta_dir, storage_options)
    jsonls = sorted(n for n in store.listdir("") if n.endswith(".jsonl"))
    for folder in store.listdir(""):  # per-rank sub-folders
        jsonls += sorted(f"{folder}/{n}" for n in store.listdir(folder) if n.endswith(".jsonl"))
    if not jsonls:
        raise FileNotFoundError(f"{meta_dir}: no *.jsonl files")
    writer = TaskWriter(output_url, storage_options, max_samples_per_shard)
    null, hidden = None, None
    for rel in jsonls:
        jsonl = join(meta_dir, rel)
        for number, text in iter_lines(jsonl, storage_options):
            try:
                record = parse_line(text, jsonl, number)
            except RecordError as err:
                writer.fail(Failure(err.file, err.line, "invalid_row", err.reason, err.field, text))
                continue
            row = json.loads(text)
            base = jsonl.rsplit("/", 1)[0]
            try:
                sources = [imaging.load(u, storage_options) for u in record.sources]
                target = imaging.load(record.target, storage_options)
            except imaging.ImageLoadError as exc:
                writer.fail(Failure(jsonl, number, exc.kind, str(exc), None, text))
                continue
            embeddings: dict[str, Any] = {}
            try:
                for field, variant in LEGACY_FIELDS.items():
                    if row.get(field):
                        ref = (
                            row[field] if "://" in row[field] or row[field].startswith("/") else join(base, row[field])
                        )
                        embeddings[variant] = load_pt_tensor(ref, storage_options)
            except FileNotFoundError as exc:
                writer.fail(Failure(jsonl, number, "missing_embedding", f"{field}: {exc}", field, text))
                continue
            except Exception as exc:
                writer.fail(
                    Failure(jsonl, number, "bad_embedding", f"{field}: {type(exc).__name__}: {exc}", field, text)
                )
                continue
            sample: PreparedSample = sample_from_images(record, sources, target)
            # per-rank files may share a name: the key comes from the path under meta_dir
            sample.key = sample.meta["key"] = sample_key(rel.replace("/", "_"), number)
            for size_field in ("source_image_size", "edit_image_size"):
                if size_field in row:
                    sample.meta["extra"].pop(size_field, None)
            if not sources and "drop" in embeddings:  # T2I empty text is the task's null embedding
                null = null if null is not None else embeddings["drop"]
                del embeddings["drop"]
            hidden = hidden or next((int(t.shape[1]) for t in embeddings.values()), None)
            writer.add(sample, embeddings)
    if hidden is None and null is not None:
        hidden = int(null.shape[1])
    base_manifest = new_manifest(
        output_url.rstrip("/").rsplit("/", 1)[-1],
        {"path": None, "config_sha256": None, "hidden_size": hidden, "compute_dtype": None, "converted_from": meta_dir},
        "firered",
        {},
    )
    return writer.close(
        base_manifest,
        {"inverse": True, "converted_from": meta_dir},
        embedding_to_npy(null) if null is not None else None,
    )


def reshard(url: str, output_url: str, storage_options: dict | None, max_samples_per_shard: int) -> dict:
    """Copy a task into shards of ``max_samples_per_shard`` (merging or splitting); bytes are kept as stored."""
    task = open_task(url, storage_options)
    if task.manifest is None:
        raise FileNotFoundError(task.error)
    writer = TaskWriter(output_url, storage_options, max_samples_per_shard)
    for shard_url in task.shard_urls():
        for key, members in iter_samples(shard_url, storage_options):
            meta = sample_meta(members)
            images = {}
            for entry, role in [(meta["target"], "target")] + [
                (s, f"source{i}") for i, s in enumerate(meta["sources"])
            ]:
                ext = entry["member"].split(".", 1)[1]
                images[role] = (ext, members[entry["member"]])
            embeddings = {v: members[f"emb_{v}.npy"] for v in meta.get("variants", {})}
            sample = PreparedSample(
                key=key, line=int(meta.get("line", 0)), num_sources=int(meta["num_sources"]), meta=meta, images=images
            )
            writer.add(sample, embeddings)
    source_store = Store(url, storage_options)
    for name in source_store.listdir("_failures"):  # failures recorded for the source task stay recorded
        for text in source_store.read_bytes(f"_failures/{name}").decode("utf-8").splitlines():
            if text.strip():
                entry = json.loads(text)
                writer.fail(Failure(**{k: entry.get(k) for k in ("file", "line", "kind", "reason", "field", "text")}))
    null = None
    if task.manifest.get("null_embedding"):
        null = Store(url, storage_options).read_bytes(task.manifest["null_embedding"])
    keep = ("format", "format_version", "task", "model", "prompt_style", "drop_index", "embedding")
    base = {k: task.manifest[k] for k in keep if k in task.manifest}
    base.setdefault("shards", [])
    extra = {
        k: v
        for k, v in task.manifest.items()
        if k
        not in (*keep, "shards", "totals", "samples", "failures", "failures_by_reason", "variants", "null_embedding")
    }
    extra["resharded_from"] = url
    return writer.close(base, extra, null)
