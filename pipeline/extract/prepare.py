"""One JSONL line → a sample ready for the encoder, or a failure; runs in DataLoader workers.

Everything slow and per-sample (fetching and decoding images, resizing the
condition images, tokenising, image preprocessing) happens here, off the main
process, so the encoder does not wait on I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.common import images as imaging
from pipeline.common.records import DEFAULT_MAX_ROW_BYTES, Columns, Record, RecordError, iter_lines, parse_line
from pipeline.common.variants import plan_variants
from pipeline.families.base import ConditionRefused
from pipeline.shards import copies
from pipeline.shards.format import sample_key
from pipeline.shards.writer import Failure, PreparedSample


@dataclass(frozen=True)
class PrepareOptions:
    """What preparing a line takes of the run's options: the fields of ``ExtractConfig`` of the same names
    (``common.options.derived``), and what the extractor resolves (``inverse``, the parsed storage options)."""

    inverse: bool = True
    t2i_mode: bool = False
    max_image_pixels: int = imaging.DEFAULT_MAX_PIXELS
    max_image_bytes: int = imaging.DEFAULT_MAX_BYTES
    fetch_timeout: float = imaging.DEFAULT_FETCH_TIMEOUT
    storage_options: dict[str, Any] | None = None
    skip_embeddings: bool = False
    train_copy_size: int = 0  # also store training copies for --image_sample_size this (uint8 .npy); 0: none
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES


def _record_failure(err: RecordError, text: str) -> Failure:
    if err.reason.startswith("row too large"):
        return Failure(err.file, err.line, "row_too_large", err.reason, err.field, "")  # the row is not kept
    kind = "malformed_json" if err.reason.startswith("malformed JSON") else "invalid_row"
    return Failure(err.file, err.line, kind, err.reason, err.field, text)


def prepare_record(
    record: Record,
    text: str,
    builder,
    opts: PrepareOptions,
    source_field: str = "source_image",
    target_field: str = "target_image",
) -> PreparedSample | Failure:
    """Load the images of ``record`` and build its prompts with the model family's ``builder``."""
    sources = () if opts.t2i_mode else record.sources
    loaded: dict[str, imaging.LoadedImage] = {}
    roles = [
        (f"source{i}", uri, f"{source_field}[{i}]" if len(sources) > 1 else source_field)
        for i, uri in enumerate(sources)
    ]
    roles.append(("target", record.target, target_field))
    for role, uri, fieldname in roles:
        try:
            loaded[role] = imaging.load(
                uri, opts.storage_options, opts.max_image_pixels, opts.max_image_bytes, opts.fetch_timeout
            )
        except imaging.ImageLoadError as exc:
            return Failure(record.file, record.line, exc.kind, str(exc), fieldname, text)

    sample = sample_from_images(
        record, [loaded[f"source{i}"] for i in range(len(sources))], loaded["target"], opts.train_copy_size
    )
    plan = [] if opts.skip_embeddings else plan_variants(record.texts, len(sources), opts.inverse and not opts.t2i_mode)
    conditions: dict[str, list] = {}
    for variant, role, prompt_text in plan:
        if role == "none":
            sample.prompts.append((variant, builder.t2i(prompt_text)))
            continue
        if role not in conditions:
            roles = [f"source{i}" for i in range(len(sources))] if role == "sources" else ["target"]
            pictures = [loaded[r].picture(builder.picture_mode) for r in roles]
            try:
                conditions[role] = builder.condition_images(pictures, target_size=loaded["target"].size)
            except ConditionRefused as exc:
                return Failure(record.file, record.line, "condition_refused", str(exc), source_field, text)
            if builder.fixed_conditions:  # the size the encoder saw, which training shows the VAE again
                sample.meta.setdefault("conditions", {})[role] = [list(c.size) for c in conditions[role]]
        sample.prompts.append((variant, builder.edit(conditions[role], prompt_text)))
    return sample


def sample_from_images(
    record: Record, sources: list[imaging.LoadedImage], target: imaging.LoadedImage, train_copy_size: int = 0
) -> PreparedSample:
    """The shard sample of ``record`` (metadata, original image bytes, training copies), before any embedding."""
    key = sample_key(record.file, record.line)
    meta = {
        "key": key,
        "input": record.file,
        "line": record.line,
        "num_sources": len(sources),
        **record.texts,
        "sources": [_image_meta(img, f"source{i}") for i, img in enumerate(sources)],
        "target": _image_meta(target, "target"),
        "bucket": [imaging.aspect_bucket(img.size) for img in (*sources, target)],
        "variants": {},
        "extra": record.extra,
    }
    images = {f"source{i}": (img.ext, img.data) for i, img in enumerate(sources)}
    images["target"] = (target.ext, target.data)
    if train_copy_size:
        pictures = {f"source{i}": img.rgb for i, img in enumerate(sources)} | {"target": target.rgb}
        copies.add_train_copies(meta, images, pictures, train_copy_size)
    return PreparedSample(key=key, line=record.line, num_sources=len(sources), meta=meta, images=images)


def _image_meta(img: imaging.LoadedImage, role: str) -> dict[str, Any]:
    return {"uri": img.uri, "size": list(img.size), "mode": img.original_mode, "member": f"{role}.{img.ext}"}


def prepare_line(
    text: str, file: str, line: int, builder, opts: PrepareOptions, columns: Columns
) -> PreparedSample | Failure:
    try:
        record = parse_line(text, file, line, columns)
    except RecordError as err:
        return _record_failure(err, text)
    try:
        return prepare_record(record, text, builder, opts, columns.source, columns.target)
    except Exception as exc:  # one bad sample must never stop a long run
        return Failure(file, line, "prepare_error", f"{type(exc).__name__}: {exc}", None, text)


class LineDataset(IterableDataset):
    """This rank's pending lines of one JSONL, split across DataLoader workers.

    Line ``i`` belongs to rank ``i % world_size``; lines already in committed
    shards or in the failures file (``done``) are skipped.
    """

    def __init__(
        self,
        file: str,
        rank: int,
        world_size: int,
        done: np.ndarray,
        builder,
        opts: PrepareOptions,
        columns: Columns,
    ):
        self.file, self.rank, self.world_size, self.done = file, rank, world_size, done
        self.builder, self.opts, self.columns = builder, opts, columns

    def pending(self):
        for number, text in iter_lines(self.file, self.opts.storage_options, self.opts.max_row_bytes):
            if number % self.world_size != self.rank:
                continue
            if number < len(self.done) and self.done[number]:
                continue
            yield number, text

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)  # workers preprocess; the main process owns the cores for the encoder
        for position, (number, text) in enumerate(self.pending()):
            if position % workers == worker:
                yield prepare_line(text, self.file, number, self.builder, self.opts, self.columns)
