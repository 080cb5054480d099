"""Training copies (extract --train_copy_size): crops without decoding, the same pixels, originals only when needed."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from helpers import encode_image, read_samples
from PIL import Image

from pipeline.common import images as imaging
from pipeline.crops import crop_size
from pipeline.shards import copies as copy_format
from pipeline.shards.format import COPY_PREFIX, image_entry
from pipeline.shards.reader import IndexCache, RangeReader, read_indexed_sample
from pipeline.shards.tasks import open_task
from pipeline.train.stream.batching import Picture

SPECIFIES = (
    "pipeline.crops",
    "pipeline.shards.copies",
    "pipeline.train.stream.batching",
)


def encoded(size, fmt, orientation=None) -> bytes:
    """A detailed picture (a photograph resized, plus fine noise) so that shifts and blur show."""
    from pipeline.kit.sample_data import photographs

    base = photographs()[0].convert("RGB").resize(size, Image.Resampling.LANCZOS)
    noise = np.random.default_rng(0).integers(-12, 13, size=(size[1], size[0], 3))
    img = Image.fromarray(np.clip(np.asarray(base, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    return encode_image(img, fmt, orientation, quality=92)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float() / 127.5 - 1, b.float() / 127.5 - 1
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean().clamp_min(1e-12)))


def original_crop(data: bytes, size, fraction) -> torch.Tensor:
    return imaging.decode_and_crop(imaging.open_lazy(data), data, size, fraction)


@pytest.mark.parametrize(
    "size,fmt,orientation",
    [((900, 700), "PNG", None), ((2000, 800), "PNG", None), ((1000, 1400), "JPEG", None), ((1600, 900), "JPEG", 6)],
)
def test_a_crop_of_the_copy_has_the_originals_pixels_and_a_smaller_crop_differs_by_resampling_noise(
    size, fmt, orientation
):
    """The bound, against the original decoded in full and resized once (the loader's path for a PNG, and for a
    JPEG shrunk less than 2x). The image's own crop at the copy's size (batch size 1): identical pixels. A
    smaller crop (a smaller --image_sample_size, or a batch whose mean aspect fits inside the copy) resizes the
    copy again: ≥ 40 dB PSNR (mean |Δ| ≤ 0.01 of the [-1, 1] range) on a detailed picture with pixel noise."""
    data = encoded(size, fmt, orientation)
    rgb = imaging.open_rgb(data)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    full_decode = buf.getvalue()  # the same pixels, oriented, through the loader's full-decode path
    copy = copy_format.train_copy(rgb, 512)
    assert copy is not None and copy.shape[0] * copy.shape[1] < rgb.width * rgb.height
    own = crop_size(rgb.width / rgb.height, 512 * 512)
    assert copy_format.copy_covers((copy.shape[1], copy.shape[0]), rgb.size, own)
    for fraction in [(0.0, 0.0), (0.3, 0.7), (1.0, 1.0)]:
        from_copy = copy_format.crop_from_copy(copy, rgb.size, own, fraction)
        reference = original_crop(full_decode, own, fraction)
        assert from_copy.shape == (3, own[1], own[0])
        assert torch.equal(from_copy, reference)
        if fmt == "PNG":  # what the loader gives from the original itself
            assert torch.equal(from_copy, original_crop(data, own, fraction))

    for aspect_change, area in [(1.0, 384**2), (0.95, 384**2), (0.97, 500**2)]:
        smaller = crop_size(rgb.width / rgb.height * aspect_change, area)
        assert copy_format.copy_covers((copy.shape[1], copy.shape[0]), rgb.size, smaller)
        from_copy = copy_format.crop_from_copy(copy, rgb.size, smaller, (0.5, 0.5))
        reference = original_crop(full_decode, smaller, (0.5, 0.5))
        assert psnr(from_copy, reference) >= 40
        assert float((from_copy.float() - reference.float()).abs().mean()) / 127.5 <= 0.01
    # a crop the copy cannot hold (a larger size, or another aspect) is not taken from it
    assert not copy_format.copy_covers(
        (copy.shape[1], copy.shape[0]), rgb.size, crop_size(rgb.width / rgb.height, 640**2)
    )
    assert not copy_format.copy_covers(
        (copy.shape[1], copy.shape[0]), rgb.size, crop_size(rgb.width / rgb.height * 1.3, 512**2)
    )


def test_no_copy_when_training_would_not_shrink_the_image():
    rgb = Image.new("RGB", (500, 520))
    assert copy_format.train_copy(rgb, 512) is None
    assert copy_format.train_copy(rgb, 0) is None
    assert copy_format.train_copy(rgb, 256) is not None


def test_training_reads_the_copies_and_fetches_an_original_only_for_a_crop_the_copy_cannot_hold(copied):
    task = open_task(str(copied), None)
    n = max(task.shards)
    shard = task.shards[n][0]
    reader = RangeReader(None)
    entries = IndexCache(reader).get(shard.index_url)
    entry = next(e for e in entries if any(m.startswith(COPY_PREFIX) for m in e["members"]))
    start = reader.bytes_read
    sample = read_indexed_sample(reader, shard.url, entry)
    read = reader.bytes_read - start
    originals = {ext: m[1] for ext, m in entry["members"].items() if ext.startswith(("target.", "source"))}
    copied_roles = [ext.split(".")[0][len(COPY_PREFIX) :] for ext in entry["members"] if ext.startswith(COPY_PREFIX)]
    for role in copied_roles:
        assert role not in sample.images and role in sample.image_ranges
    assert read < entry["size"] - sum(v for k, v in originals.items() if k.split(".")[0] in copied_roles) + 4096

    role = copied_roles[0]
    picture = Picture.of(sample, role)
    own = crop_size(picture.aspect, 64 * 64)
    before = reader.bytes_read
    crop = picture.crop(own, (0.5, 0.5), reader)
    assert reader.bytes_read == before, "the copy holds the crop: nothing more is read"
    bigger = crop_size(picture.aspect, 160 * 160)
    crop_big = picture.crop(bigger, (0.5, 0.5), reader)
    assert reader.bytes_read > before, "the original is read by offset for a crop the copy cannot hold"
    data = sample.images[role]
    assert torch.equal(crop_big, original_crop(data, bigger, (0.5, 0.5)))
    assert (
        torch.equal(crop, original_crop(data, own, (0.5, 0.5)))
        or psnr(crop, original_crop(data, own, (0.5, 0.5))) >= 45
    )


def test_the_training_stream_gives_the_same_batches_with_copies_at_batch_size_one(copied, plain):
    """Through the real stream (order, read-ahead, pools, inverse swaps, batch assembly): the batches of the task
    with copies equal those without, pixel for pixel, for every PNG and WebP image. The sample data's JPEGs shrink
    2x or more at 64 px, which the original path decodes at a reduced DCT scale (an approximation, 26-46 dB at
    these 64-px crops); the copy comes from a full decode and equals a full decode's crop (test above)."""
    from pipeline.shards.tasks import discover_tasks
    from pipeline.train.config.data import StreamConfig
    from pipeline.train.stream.dataset import MixedBatchDataset
    from pipeline.train.stream.mix import plan_mix

    def batches(root):
        tasks = discover_tasks(str(root.parent), None)
        n_weights = {str(n): 1 for n in tasks["compose_multi"].counts()}
        config = StreamConfig(
            batch_size=1, seed=3, image_sample_size=64, enable_inverse=True, online_prompts=True,
            readahead_bytes=1 << 20,
        )  # fmt: skip
        dataset = MixedBatchDataset(tasks, plan_mix(tasks, {"compose_multi": 1}, n_weights), 0, 1, config)
        stream = iter(dataset)
        return [next(stream) for _ in range(30)]

    with_copies, without = batches(copied), batches(plain)
    metas = {key: json.loads(m["json"]) for key, m in read_samples(str(copied)).items()}
    identical = 0
    for a, b in zip(with_copies, without, strict=True):
        assert a["keys"] == b["keys"] and a["texts"] == b["texts"] and a["variants"] == b["variants"]
        meta, inverse = metas[a["keys"][0]], a["variants"][0].endswith("_inv")
        roles = ["target", *(f"source{k}" for k in range(len(a["sources"])))]
        if inverse:
            roles[0], roles[1] = roles[1], roles[0]
        for role, x, y in zip(roles, [a["target"], *a["sources"]], [b["target"], *b["sources"]], strict=True):
            assert x.shape == y.shape and x.dtype == y.dtype == torch.uint8
            entry = image_entry(meta, role)
            if torch.equal(x, y):
                identical += 1
            else:  # only a JPEG's original path approximates (reduced-DCT decode); the copy is a full decode
                assert entry["member"].endswith(".jpg") and psnr(x, y) >= 20, (role, entry, psnr(x, y))
    assert identical >= 40
