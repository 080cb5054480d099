"""The training crop's geometry, defined once: the crop's size at an aspect, the scale that covers it, its offset.

Training crops (``pipeline.common.images``), the shards' training copies
(``pipeline.shards.copies``), validation and the plan all size images by these
rules, so a copy made at extraction holds exactly the pixels training crops.
"""

from __future__ import annotations

import math


def crop_size(aspect: float, area: int, multiple: int = 32) -> tuple[int, int]:
    """(width, height) with about ``area`` pixels at ``aspect``, sides multiples of ``multiple``."""
    width = (area * aspect) ** 0.5
    height = width / aspect
    return max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple)


def cover(image_size: tuple[int, int], size: tuple[int, int], swap: bool) -> tuple[int, int]:
    """The (width, height) an image of ``image_size`` is scaled to so that it covers ``size`` (short side first)."""
    (w, h), (cw, ch) = image_size, size
    scale = max(cw / w, ch / h)
    rw, rh = max(cw, math.ceil(w * scale)), max(ch, math.ceil(h * scale))
    return (rh, rw) if swap else (rw, rh)


def crop_offset(resized: tuple[int, int], size: tuple[int, int], fraction: tuple[float, float]) -> tuple[int, int]:
    """Where a crop of ``size`` starts in an image resized to ``resized``: ``fraction`` of the excess (x, y)."""
    (rw, rh), (cw, ch) = resized, size
    return int(fraction[0] * (rw - cw)), int(fraction[1] * (rh - ch))
