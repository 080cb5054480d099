"""Assemble: raw samples of one (task, N, bucket) → a training batch, and nothing else.

Each sample comes with its draws made (``decide.py``: variant, text, inverse,
crop offsets). Per sample: the inverse swap of target and source 0, its embedding
(or the null embedding for empty text without sources). Per batch: one crop size
(area ≈ image_sample_size², aspect = batch mean, sides multiples of 32) for the
target and one per source position, each sample's offsets the same for its target
and sources. A sample that cannot be used is reported as :class:`UnusableSample`
(its index and cause) and assembly stops: the stream replaces it and assembles
again; nothing here calls back into the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline import families
from pipeline.common import images as imaging
from pipeline.crops import crop_size
from pipeline.shards import copies
from pipeline.shards.format import copy_role, image_entry, npy_to_embedding, npy_to_image
from pipeline.shards.reader import RangeReader, RawSample
from pipeline.shards.tasks import Task
from pipeline.train.config.data import StreamConfig
from pipeline.train.stream.errors import UnusableSample


def pad_embeddings(embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``[L_i, D]`` to ``[B, max L, D]`` with a 0/1 mask."""
    longest = max(e.shape[0] for e in embeddings)
    first = embeddings[0]
    if len(embeddings) == 1:  # nothing to pad: no copy
        return first[None], torch.ones((1, longest), dtype=torch.long, device=first.device)
    out = torch.zeros((len(embeddings), longest, first.shape[1]), dtype=first.dtype, device=first.device)
    mask = torch.zeros((len(embeddings), longest), dtype=torch.long, device=first.device)
    for i, e in enumerate(embeddings):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
    return out, mask


class PromptTooLong(ValueError):
    """A sample's prompt embedding is longer than the transformer can position: skipped like a corrupt sample."""


class BadEmbedding(ValueError):
    """A stored embedding the model cannot take (another width, NaN/Inf): the sample is skipped and counted."""


def checked_embedding(emb: torch.Tensor, task: Task, key: str, variant: str) -> torch.Tensor:
    """``emb`` when the model can take it: as wide as the task's embeddings (a sample grafted from a task made with
    another encoder would stop the run in the transformer, and every resume after it) and finite (a NaN would cost
    the whole step, unnamed)."""
    where = f"task {task.name} sample {key} embedding {variant}"
    hidden = task.hidden_size
    if hidden is not None and emb.shape[1] != hidden:
        raise BadEmbedding(f"{where}: width {emb.shape[1]}, the task's embeddings are {hidden} wide")
    if not bool(torch.isfinite(emb).all()):
        raise BadEmbedding(f"{where}: holds NaN/Inf values")
    return emb


def fetch_embedding(sample: RawSample, variant: str, reader: RangeReader) -> torch.Tensor:
    """Only this variant's bytes are fetched when the shard is indexed."""
    if variant in sample.embeddings:
        return npy_to_embedding(sample.embeddings[variant])
    start, end = sample.embedding_ranges[variant]
    return npy_to_embedding(reader.read(sample.shard_url, start, end))


def null_embedding(task: Task, reader: RangeReader, cache: dict[str, bytes]) -> torch.Tensor:
    if task.null_embedding_url is None:
        raise RuntimeError(f"task {task.name} has text-to-image samples with empty text but no null_embedding.npy")
    if task.name not in cache:
        cache[task.name] = reader.read(task.null_embedding_url)
    return npy_to_embedding(cache[task.name])


@dataclass
class Picture:
    """One image of a sample as the batch crops it: from its training copy when the copy holds enough pixels
    for the crop, else from the original (read by offset now if only the copy came with the sample)."""

    sample: RawSample
    role: str
    aspect: float  # width / height as inference sees it (EXIF orientation applied)
    copy: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)  # the original's (width, height), oriented, when it has a copy
    lazy: Any = None  # the original opened lazily (header only), when it was read

    @classmethod
    def of(cls, sample: RawSample, role: str) -> Picture:
        """Checks the header (a broken image fails here, before any decoding) and takes the aspect."""
        copy = sample.images.get(copy_role(role))
        if copy is not None:
            w, h = image_entry(sample.meta, role)["size"]
            return cls(sample, role, w / h, copy=npy_to_image(copy), size=(w, h))
        lazy = imaging.open_lazy(sample.images[role])
        return cls(sample, role, imaging.aspect_of(lazy), lazy=lazy)

    def crop(self, size: tuple[int, int], fraction, reader: RangeReader, channels: int = 3) -> torch.Tensor:
        covered = self.copy is not None and copies.copy_covers(
            (self.copy.shape[1], self.copy.shape[0]), self.size, size
        )
        if covered and channels == 3:
            return copies.crop_from_copy(self.copy, self.size, size, fraction)
        data = self.sample.original(self.role, reader)
        lazy, self.lazy = self.lazy or imaging.open_lazy(data), None  # decoding consumes the lazily opened image
        return imaging.decode_and_crop(lazy, data, size, fraction, channels)

    def resized(self, size: tuple[int, int], reader: RangeReader, family) -> torch.Tensor:
        """The whole picture resized (never cropped) to ``size`` as the family's pipeline resizes a condition."""
        return family.condition_pixels(self.sample.original(self.role, reader), size)


def assemble_batch(
    samples: list[RawSample],
    task: Task,
    num_sources: int,
    step: int,
    rank: int,
    config: StreamConfig,
    reader: RangeReader,
    null_cache: dict[str, bytes],
) -> dict[str, Any]:
    """One batch; with ``config.online_prompts`` it carries what the trainer needs to encode the prompts.

    ``target`` and ``sources`` are uint8 [B, 3, H, W] pixels (the loss scales them to [-1, 1] on
    the device).  Images are opened lazily (headers only) first, so the batch's crop sizes are known
    before any pixel is decoded; each image is then cropped from its training copy when the shard
    has one that holds enough pixels (no decoding at all), else decoded at the smallest JPEG scale
    that still covers its resize (``imaging.decode_and_crop``).  Raises :class:`UnusableSample` for
    the first sample whose image or embedding cannot be read or whose prompt does not fit.

    Why one function: it is the worker's hot path, read once per batch in the order the pixels move (headers,
    crop sizes, crops, embeddings, the batch's tensors); every step needs the sizes the one before decided.
    """
    online = config.online_prompts
    family = families.get(task.family)
    prepared = [
        _prepare(i, sample, task, num_sources, online, reader, null_cache, family) for i, sample in enumerate(samples)
    ]
    area = config.image_sample_size**2
    target_size = crop_size(float(np.mean([p["pictures"][0].aspect for p in prepared])), area)
    if family.fixed_conditions:  # each condition at the size its embedding was made at (one sample per batch)
        try:
            source_sizes = [tuple(size) for size in stored_condition_sizes(samples[0], num_sources)]
        except ValueError as exc:
            raise UnusableSample(0, exc) from exc
    else:
        source_sizes = family.source_sizes(
            [[p["pictures"][k + 1].aspect for p in prepared] for k in range(num_sources)], area
        )
    if not online:  # a prompt the transformer cannot position at these sizes would stop the run
        limit = family.text_positions([target_size, *source_sizes])
        for i, p in enumerate(prepared):
            if p["emb"].shape[0] > limit:
                raise UnusableSample(
                    i,
                    PromptTooLong(
                        f"a prompt of {p['emb'].shape[0]} tokens, over the {limit} text positions the "
                        f"transformer has next to images of {target_size[0]}x{target_size[1]}"
                    ),
                )
    target_tensors, source_tensors = [], [[] for _ in range(num_sources)]
    for i, (p, sample) in enumerate(zip(prepared, samples, strict=True)):
        try:
            channels = family.pixel_channels
            target_tensors.append(p["pictures"][0].crop(target_size, sample.choice.fraction, reader, channels))
            for k, size in enumerate(source_sizes):
                picture = p["pictures"][k + 1]
                source_tensors[k].append(
                    picture.resized(size, reader, family) if family.fixed_conditions
                    else picture.crop(size, sample.choice.fraction, reader, channels)
                )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported with its index; the stream decides
            raise UnusableSample(i, exc) from exc
    batch: dict[str, Any] = {
        "step": step,
        "rank": rank,
        "task": task.name,
        "num_sources": num_sources,
        "bucket": samples[0].meta["bucket"],
        "keys": [s.key for s in samples],
        "variants": [p["variant"] for p in prepared],
        "texts": [p["text"] for p in prepared],
        "target": torch.stack(target_tensors),
        "sources": [torch.stack(col) for col in source_tensors],
    }
    if online:
        batch["conditions"] = [p["emb"] for p in prepared]
        return batch
    batch["prompt_embeds"], batch["prompt_mask"] = pad_embeddings([p["emb"] for p in prepared])
    for key in sorted(set(prepared[0]["prompt"]) - {"prompt_embeds"}):  # the family's per-row prompt tensors
        batch[key] = pad_rows([p["prompt"][key] for p in prepared], batch["prompt_mask"].shape[1])
    return batch


def stored_condition_sizes(sample: RawSample, num_sources: int) -> list[list[int]]:
    """The (width, height) its conditions were encoded at, as extraction recorded them: the sources', or the
    target's for an inverse variant (conditioned on the target)."""
    if num_sources == 0:
        return []
    recorded = sample.meta.get("conditions") or {}
    sizes = recorded.get("target" if sample.choice.inverse else "sources")
    if not isinstance(sizes, list) or len(sizes) != num_sources:
        raise ValueError(f"sample {sample.key}: its json records no condition sizes for {num_sources} condition(s)")
    return sizes


def pad_rows(values: list[torch.Tensor], length: int) -> torch.Tensor:
    """``[L_i]`` tensors zero-padded to ``[B, length]`` (beside :func:`pad_embeddings`' rows)."""
    out = values[0].new_zeros((len(values), length))
    for i, value in enumerate(values):
        out[i, : value.shape[0]] = value
    return out


def _prepare(
    index: int,
    sample: RawSample,
    task: Task,
    num_sources: int,
    online: bool,
    reader: RangeReader,
    null_cache: dict[str, bytes],
    family,
) -> dict[str, Any]:
    """Variant, text, embedding (or what encodes it online) and lazily opened images of one sample; the stored
    embedding read back as the model family reads it (``prompt``: its per-sample prompt tensors)."""
    choice = sample.choice
    try:
        roles = ["target", *(f"source{k}" for k in range(num_sources))]
        if choice.inverse:
            roles[0], roles[1] = roles[1], roles[0]
        pictures = [Picture.of(sample, role) for role in roles]
        if online:
            role_images = [sample.original(r, reader) for r in (["target"] if choice.inverse else roles[1:])]
            emb: Any = {
                "kind": "t2i" if num_sources == 0 else "edit",
                "text": choice.text,
                "images": role_images if num_sources else [],
                "target_size": sample.meta["target"]["size"],
            }
        prompt: dict[str, torch.Tensor] = {}
        if not online:
            null, variant = choice.variant == "null", choice.variant
            stored = null_embedding(task, reader, null_cache) if null else fetch_embedding(sample, variant, reader)
            rows = checked_embedding(stored, task, sample.key, choice.variant)
            entry = None if null else (sample.meta.get("variants") or {}).get(choice.variant)
            prompt = family.prompt_from_sample(rows, entry)
            emb = prompt["prompt_embeds"]
    except Exception as exc:  # noqa: BLE001 - reported with its index; the stream decides
        raise UnusableSample(index, exc) from exc
    return {"variant": choice.variant, "text": choice.text, "emb": emb, "prompt": prompt, "pictures": pictures}
