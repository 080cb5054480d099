"""Qwen-Image-Edit's condition images: what the VLM sees of each source, as diffusers' Edit-Plus pipeline sizes it
(``calculate_dimensions`` at a 384² area, ``VaeImageProcessor.resize``), or the original tool's ``firered`` crop."""

from __future__ import annotations

from PIL import Image

CONDITION_AREA = 384 * 384  # diffusers' CONDITION_IMAGE_SIZE for Edit-Plus


def condition_size(aspect: float, area: int = CONDITION_AREA) -> tuple[int, int]:
    """(width, height) of a condition image: ``area`` at ``aspect``, sides multiples of 32."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    return calculate_dimensions(area, aspect)


_RESIZER = None


def _resizer():
    global _RESIZER
    if _RESIZER is None:
        from diffusers.image_processor import VaeImageProcessor

        _RESIZER = VaeImageProcessor(vae_scale_factor=16)  # what Edit-Plus builds for an 8x VAE
    return _RESIZER


def condition_image(img: Image.Image) -> Image.Image:
    """Resize (no crop) to ~384² area keeping aspect, as Edit-Plus does before encoding."""
    w, h = condition_size(img.width / img.height)
    return _resizer().resize(img, h, w)


# PixArt-α's published 512² bucket table, height/width ratio -> (height, width): the original tool
# crops every image of a sample to the entry closest to the *target's* ratio.
FIRERED_BUCKETS_512: dict[float, tuple[int, int]] = {
    0.25: (256, 1024), 0.26: (256, 992), 0.27: (256, 960), 0.28: (256, 928),
    0.32: (288, 896), 0.33: (288, 864), 0.35: (288, 832), 0.4: (320, 800),
    0.42: (320, 768), 0.48: (352, 736), 0.5: (352, 704), 0.52: (352, 672),
    0.57: (384, 672), 0.6: (384, 640), 0.68: (416, 608), 0.72: (416, 576),
    0.78: (448, 576), 0.82: (448, 544), 0.88: (480, 544), 0.94: (480, 512),
    1.0: (512, 512), 1.07: (512, 480), 1.13: (544, 480), 1.21: (544, 448),
    1.29: (576, 448), 1.38: (576, 416), 1.46: (608, 416), 1.67: (640, 384),
    1.75: (672, 384), 2.0: (704, 352), 2.09: (736, 352), 2.4: (768, 320),
    2.5: (800, 320), 2.89: (832, 288), 3.0: (864, 288), 3.11: (896, 288),
    3.62: (928, 256), 3.75: (960, 256), 3.88: (992, 256), 4.0: (1024, 256),
}  # fmt: skip


def firered_crop(target_size: tuple[int, int], image_sample_size: int = 512) -> tuple[int, int]:
    """(height, width) of the original tool's crop for a target of ``target_size`` (width, height).

    The table entry whose ratio is closest to the target's h/w (first on a tie),
    scaled by ``image_sample_size``/512, each side floored to a multiple of 16.
    """
    w, h = target_size
    ratio = min(FIRERED_BUCKETS_512, key=lambda key: abs(key - h / w))
    scale = image_sample_size / 512
    eh, ew = FIRERED_BUCKETS_512[ratio]
    return int(eh * scale / 16) * 16, int(ew * scale / 16) * 16


def firered_condition_image(
    img: Image.Image, target_size: tuple[int, int], image_sample_size: int = 512
) -> Image.Image:
    """The original tool's condition image: every image of a sample is fitted to the *target's* crop.

    Bilinear resize to exactly the size that makes the crop fit the target's
    (w, h) (so a source of another aspect is stretched, as the original does),
    centre crop, then Lanczos to the 384² area at the crop's aspect, sides /32.
    """
    w, h = target_size
    crop_h, crop_w = firered_crop(target_size, image_sample_size)
    if crop_h / h > crop_w / w:
        resize_h, resize_w = crop_h, int(w * crop_h / h)
    else:
        resize_h, resize_w = int(h * crop_w / w), crop_w
    resized = img.resize((resize_w, resize_h), Image.Resampling.BILINEAR)
    top, left = int(round((resize_h - crop_h) / 2.0)), int(round((resize_w - crop_w) / 2.0))
    cropped = resized.crop((left, top, left + crop_w, top + crop_h))
    out_w, out_h = condition_size(crop_w / crop_h)
    return cropped.resize((out_w, out_h), Image.Resampling.LANCZOS)
