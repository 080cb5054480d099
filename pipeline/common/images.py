"""Image loading, validation and the one place images are resized or bucketed.

Images reach the encoder as diffusers' ``load_image`` gives them (EXIF
orientation applied, converted to RGB) and condition images are resized with
diffusers' own ``calculate_dimensions`` and ``VaeImageProcessor.resize``, so
training conditions equal inference conditions.  Shards keep the original
bytes when they are already PNG/JPEG/WebP, lossless PNG otherwise.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipeline.shards.storage import read_uri

CONDITION_AREA = 384 * 384  # diffusers' CONDITION_IMAGE_SIZE for Edit-Plus
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
MIN_BUCKET, MAX_BUCKET = 1 / 4, 4.0


class ImageLoadError(Exception):
    """An image that cannot be used; ``kind`` is a short reason code for summaries."""

    def __init__(self, kind: str, uri: str, detail: str):
        self.kind = kind
        self.uri = uri
        super().__init__(f"{kind}: {uri}: {detail}")


@dataclass
class LoadedImage:
    """Original bytes to store, their extension, and the RGB picture the encoder sees."""

    uri: str
    data: bytes
    ext: str
    rgb: Image.Image
    original_mode: str

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size


def fetch(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    try:
        return read_uri(uri, storage_options)
    except FileNotFoundError as exc:
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, FileNotFoundError):  # fsspec/http wraps connection errors
            raise ImageLoadError("fetch_error", uri, f"{type(cause).__name__}: {cause}") from exc
        raise ImageLoadError("missing_image", uri, "no such file or object") from exc
    except PermissionError as exc:
        raise ImageLoadError("unreadable_image", uri, str(exc) or "permission denied") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError("unreadable_image", uri, "is a directory") from exc
    except Exception as exc:  # network errors come in many types (aiohttp, botocore, OSError)
        raise ImageLoadError("fetch_error", uri, f"{type(exc).__name__}: {exc}") from exc


def decode(uri: str, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode fully (so truncation is caught here), apply EXIF orientation, convert to RGB."""
    if not data:
        raise ImageLoadError("not_an_image", uri, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageLoadError("image_too_large", uri, f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
            img.load()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError("image_too_large", uri, str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError("not_an_image", uri, "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError("truncated_image", uri, f"cannot decode: {exc}") from exc
    fmt = img.format or ""
    mode = img.mode
    rgb = _as_inference_rgb(img)
    if fmt in KEPT_FORMATS:
        stored, ext = data, KEPT_FORMATS[fmt]
    else:
        buf = io.BytesIO()
        (img if mode in ("RGB", "RGBA", "L", "LA", "P", "I;16", "I") else img.convert("RGBA")).save(buf, format="PNG")
        stored, ext = buf.getvalue(), "png"
    return LoadedImage(uri=uri, data=stored, ext=ext, rgb=rgb, original_mode=mode)


def load(uri: str, storage_options: dict[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    return decode(uri, fetch(uri, storage_options), max_pixels)


def aspect_bucket(size: tuple[int, int]) -> float:
    """clamp(w/h, 1/4, 4) rounded to steps of 0.1 (the original tool's bucketing)."""
    w, h = size
    return round(min(max(w / h, MIN_BUCKET), MAX_BUCKET), 1)


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


def center_crop_to_aspect(img: Image.Image, aspect: float) -> Image.Image:
    """Largest centred crop with width/height = ``aspect``."""
    w, h = img.size
    if w / h > aspect:
        cw, ch = max(1, round(h * aspect)), h
    else:
        cw, ch = w, max(1, round(w / aspect))
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def firered_condition_image(img: Image.Image, target_bucket: float) -> Image.Image:
    """The original tool's variant: centre-crop to the target's bucket, then resize to ~384² area."""
    cropped = center_crop_to_aspect(img, target_bucket)
    w, h = condition_size(target_bucket)
    return _resizer().resize(cropped, h, w)


def _as_inference_rgb(img: Image.Image) -> Image.Image:
    """What diffusers' ``load_image`` does to a PIL image: EXIF orientation applied, converted to RGB."""
    from diffusers.utils import load_image

    return load_image(img)


def open_rgb(data: bytes) -> Image.Image:
    """Decode stored image bytes as a user's inference script would see them."""
    return _as_inference_rgb(Image.open(io.BytesIO(data)))


def crop_size(aspect: float, area: int, multiple: int = 32) -> tuple[int, int]:
    """(width, height) with about ``area`` pixels at ``aspect``, sides multiples of ``multiple``."""
    width = (area * aspect) ** 0.5
    height = width / aspect
    return max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple)


def resize_and_crop(img: Image.Image, size: tuple[int, int], fraction: tuple[float, float]) -> Image.Image:
    """Scale so ``img`` covers ``size`` (short side first), then crop at ``fraction`` of the excess."""
    cw, ch = size
    scale = max(cw / img.width, ch / img.height)
    rw, rh = max(cw, math.ceil(img.width * scale)), max(ch, math.ceil(img.height * scale))
    resized = img.resize((rw, rh), Image.Resampling.BICUBIC)
    x0, y0 = int(fraction[0] * (rw - cw)), int(fraction[1] * (rh - ch))
    return resized.crop((x0, y0, x0 + cw, y0 + ch))
