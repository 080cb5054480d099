"""``--prompt_style firered``: condition images as the original tool makes them (issue 13, item 4)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import PIXART_512, firered_reference_conditions
from PIL import Image

from pipeline.families.qwen_edit import geometry

SPECIFIES = (
    "pipeline.families.qwen_edit",
    "pipeline.families.qwen_edit.geometry",
)

# target (w, h) -> condition (w, h), from the issue; "today" is what the 0.1-step buckets gave before
EXAMPLES = {(1000, 600): (480, 288), (768, 1024): (352, 448), (1080, 1920): (288, 512), (800, 600): (448, 320)}
BEFORE = {(1000, 600): (512, 288), (768, 1024): (352, 416), (1080, 1920): (288, 480), (800, 600): (448, 352)}


def _picture(size, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_the_table_is_pixarts_512_table():
    assert len(geometry.FIRERED_BUCKETS_512) == 40
    assert [(k, *v) for k, v in geometry.FIRERED_BUCKETS_512.items()] == [(float(k), h, w) for k, h, w in PIXART_512]


@pytest.mark.parametrize("target", sorted(EXAMPLES))
def test_condition_sizes_match_the_original_tool(target):
    out = geometry.firered_condition_image(_picture(target), target)
    assert out.size == EXAMPLES[target] != BEFORE[target]
    assert firered_reference_conditions([_picture(target)], target)[0].size == EXAMPLES[target]


@pytest.mark.parametrize(
    "source, target, sample_size",
    [((1000, 600), (1000, 600), 512), ((640, 640), (1000, 600), 512), ((300, 900), (768, 1024), 1024),
     ((1920, 1080), (1080, 1920), 768)],
)  # fmt: skip
def test_condition_pixels_equal_an_independent_computation(source, target, sample_size):
    """Sources of another aspect are fitted to the *target's* crop (stretched), as the original does."""
    picture = _picture(source, seed=sum(source))
    ours = geometry.firered_condition_image(picture, target, sample_size)
    reference = firered_reference_conditions([picture], target, sample_size)[0]
    assert ours.size == reference.size
    assert np.array_equal(np.asarray(ours), np.asarray(reference))


def test_image_sample_size_scales_the_crop():
    assert geometry.firered_crop((1000, 600), 512) == (384, 640)
    assert geometry.firered_crop((1000, 600), 1024) == (768, 1280)
    assert geometry.firered_crop((1000, 600), 400) == (288, 496)  # 300 -> 288, 500 -> 496: floored to /16


def test_the_qwen_edit_family_is_the_default_and_knows_both_prompt_styles():
    from pipeline.families import get
    from pipeline.families.qwen_edit import QwenEdit

    family = get(None)
    assert isinstance(family, QwenEdit) and family.name == "qwen_edit"
    assert set(family.prompt_styles) >= {"diffusers", "firered"}
