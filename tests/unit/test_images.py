"""``common/images.py``: a 16-bit image reaches the encoder, the training copies and the training crops as the same
8-bit picture (its high byte), never as Pillow's clipped white; floating-point pixels are a named failure."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.common import images as imaging
from pipeline.shards import copies


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def gradient():
    """A 16-bit grey gradient over the whole range (0 … 65535) and the 8-bit picture it stands for (its high byte)."""
    values = np.linspace(0, 65535, 96 * 80).reshape(80, 96).astype(np.uint16)
    return png(values), png((values >> 8).astype(np.uint8))


def test_sixteen_bits_reach_the_encoder_and_the_training_copy_as_their_high_byte(gradient):
    sixteen, eight = gradient
    loaded, expected = imaging.decode("g16.png", sixteen), imaging.decode("g8.png", eight)
    assert Image.open(io.BytesIO(sixteen)).mode == "I;16" and loaded.original_mode == "I;16"
    assert np.array_equal(np.asarray(loaded.rgb), np.asarray(expected.rgb)), "what the encoder sees"
    assert np.asarray(loaded.rgb).mean() < 200, "not clipped to white"
    copy16, copy8 = copies.train_copy(loaded.rgb, 48), copies.train_copy(expected.rgb, 48)
    assert copy16 is not None and np.array_equal(copy16, copy8), "the training copy (--train_copy_size)"


def test_sixteen_bits_reach_the_training_crop_as_their_high_byte_without_copies(gradient):
    sixteen, eight = gradient
    size, fraction = (64, 64), (0.5, 0.25)
    got = imaging.decode_and_crop(imaging.open_lazy(sixteen), sixteen, size, fraction)
    want = imaging.decode_and_crop(imaging.open_lazy(eight), eight, size, fraction)
    assert got.dtype == torch.uint8 and torch.equal(got, want)


def test_floating_point_pixels_are_a_named_failure():
    buffer = io.BytesIO()
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(buffer, format="TIFF")
    with pytest.raises(imaging.ImageLoadError, match="unsupported_image: f.tiff: floating-point pixels"):
        imaging.decode("f.tiff", buffer.getvalue())
