"""Training copies: each image as training at one ``--image_sample_size`` resizes it, stored beside the original.

Part of the shard format (v1's optional ``copy_<role>.npy`` members, the ``copy``
entry of a role's json): extraction, convert-legacy and reshard write them
(:func:`add_train_copies`); the training stream crops from a copy instead of
decoding the original whenever the copy holds the pixels the crop needs
(:func:`copy_covers`, :func:`crop_from_copy`).  The geometry is the training crop's
(``pipeline.crops``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.crops import cover, crop_offset, crop_size
from pipeline.shards.format import copy_role, image_entry, image_to_npy


def train_copy(rgb: Image.Image, train_copy_size: int) -> np.ndarray | None:
    """The image as training at ``--image_sample_size train_copy_size`` resizes it, uint8 [h, w, 3]; None when
    that is not smaller than the image.

    The size is the cover of the image's own crop (:func:`crop_size` at its aspect) and the
    resampling is the trainer's (bicubic, antialiased, on uint8), so a batch whose crop is the
    image's own — always at batch size 1 — crops the copy without resizing it, with the pixels
    the original would give.
    """
    w, h = rgb.size
    if train_copy_size <= 0:
        return None
    rw, rh = cover((w, h), crop_size(w / h, train_copy_size**2), False)
    if rw * rh >= w * h:
        return None
    pixels = torch.from_numpy(np.array(rgb.convert("RGB"))).permute(2, 0, 1)[None]
    small = torch.nn.functional.interpolate(pixels, size=(rh, rw), mode="bicubic", antialias=True)[0]
    return small.permute(1, 2, 0).contiguous().numpy()


def add_train_copies(
    meta: dict[str, Any], images: dict[str, tuple[str, bytes]], pictures: dict[str, Image.Image], train_copy_size: int
) -> None:
    """Put the training copy of each role of ``pictures`` (oriented RGB) into ``images`` (role → (ext, bytes), as
    ``sample_members`` takes them) and its ``copy`` entry into the role's json entry; drop stale ones."""
    for role, rgb in pictures.items():
        entry = image_entry(meta, role)
        entry.pop("copy", None)
        images.pop(copy_role(role), None)
        entry["size"] = list(rgb.size)  # the oriented size: the copy's geometry and the batch's aspect come from it
        pixels = train_copy(rgb, train_copy_size)
        if pixels is not None:
            images[copy_role(role)] = ("npy", image_to_npy(pixels))
            entry["copy"] = {"member": f"{copy_role(role)}.npy", "size": [pixels.shape[1], pixels.shape[0]]}


def copy_covers(copy_size: tuple[int, int], original_size: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether a copy of ``copy_size`` (w, h) holds the pixels a crop of ``size`` takes from the original of
    ``original_size`` (w, h, oriented): the original's resize for that crop is no larger than the copy."""
    rw, rh = cover(original_size, size, False)
    return rw <= copy_size[0] and rh <= copy_size[1]


def crop_from_copy(
    pixels: np.ndarray, original_size: tuple[int, int], size: tuple[int, int], fraction: tuple[float, float]
) -> torch.Tensor:
    """The crop of :func:`decode_and_crop`, from a training copy (uint8 [h, w, 3]) instead of the original.

    The geometry is the original's: the copy is resized to the size the original would be
    resized to, and cropped at the same offset.  For the image's own crop that size is the
    copy's: no resize, the original's pixels.  A smaller crop (a batch's mean aspect, a
    smaller ``--image_sample_size``) resamples the copy once more (tests/{unit,integration}/test_train_copies.py
    states the bound).
    """
    cw, ch = size
    h, w = pixels.shape[:2]
    rw, rh = cover(original_size, size, False)
    x0, y0 = crop_offset((rw, rh), size, fraction)
    with warnings.catch_warnings():  # a read-only view of the shard's bytes: only read here, never written
        warnings.simplefilter("ignore", UserWarning)
        view = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # channels-last: the SIMD uint8 kernel's layout
    if (rw, rh) == (w, h):
        resized = view[0]
    else:
        resized = torch.nn.functional.interpolate(view, size=(rh, rw), mode="bicubic", antialias=True)[0]
    return resized[:, y0 : y0 + ch, x0 : x0 + cw]
