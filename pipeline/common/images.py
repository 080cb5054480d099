"""Image loading, validation and the one place images are resized or bucketed.

Images reach the encoder as diffusers' ``load_image`` gives them (EXIF
orientation applied, converted to RGB) and condition images are resized with
diffusers' own ``calculate_dimensions`` and ``VaeImageProcessor.resize``, so
training conditions equal inference conditions.  Shards keep the original
bytes when they are already PNG/JPEG/WebP, lossless PNG otherwise.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.crops import cover, crop_offset
from pipeline.shards.storage import TooLarge, read_uri

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
DEFAULT_MAX_BYTES = 64 << 20  # a bigger "image" (a mistyped URL, /dev/zero) is refused, not read whole
DEFAULT_FETCH_TIMEOUT = 60.0  # seconds to connect / wait for data over http(s) and S3
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
    oriented: Image.Image | None = None  # the decoded picture, EXIF orientation applied, 8 bits, its own mode

    def picture(self, mode: str) -> Image.Image:
        """The picture in ``mode``: ``RGB`` (what diffusers' ``load_image`` gives) or ``RGBA`` (alpha kept; an
        image without one is opaque), for the families whose VAE reads four channels."""
        if mode == "RGB" or self.oriented is None:
            return self.rgb
        return self.oriented if self.oriented.mode == mode else self.oriented.convert(mode)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size


def fetch(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_FETCH_TIMEOUT,
) -> bytes:
    try:
        return read_uri(uri, storage_options, max_bytes, timeout)
    except TooLarge as exc:
        raise ImageLoadError("image_too_large", uri, str(exc)) from exc
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
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):  # PIL's own limit would refuse what ours allows
        Image.MAX_IMAGE_PIXELS = max_pixels
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
    if mode == "F":
        raise ImageLoadError("unsupported_image", uri, "floating-point pixels (mode F): save it with 8 or 16 bits")
    rgb = _as_inference_rgb(img)
    oriented = to_8_bits(img) if mode in SIXTEEN_BIT_MODES else ImageOps.exif_transpose(img)
    if fmt in KEPT_FORMATS:
        stored, ext = data, KEPT_FORMATS[fmt]
    else:
        buf = io.BytesIO()
        (img if mode in ("RGB", "RGBA", "L", "LA", "P", "I;16", "I") else img.convert("RGBA")).save(buf, format="PNG")
        stored, ext = buf.getvalue(), "png"
    return LoadedImage(uri=uri, data=stored, ext=ext, rgb=rgb, original_mode=mode, oriented=oriented)


def load(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_FETCH_TIMEOUT,
) -> LoadedImage:
    return decode(uri, fetch(uri, storage_options, max_bytes, timeout), max_pixels)


def aspect_bucket(size: tuple[int, int]) -> float:
    """clamp(w/h, 1/4, 4) rounded to steps of 0.1 (the original tool's bucketing)."""
    w, h = size
    return round(min(max(w / h, MIN_BUCKET), MAX_BUCKET), 1)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes of 16-bit grey (PNG, TIFF)


def to_8_bits(img: Image.Image) -> Image.Image:
    """A 16-bit grey image as 8-bit grey, keeping the high byte of each value — what Pillow itself does to 16-bit
    RGB PNGs and libpng's ``strip_16`` to any; Pillow's RGB conversion of these modes clips instead (a white
    picture). Mode ``I`` (32-bit) is read as 16-bit, clipped to 0..65535. Other modes pass unchanged."""
    if img.mode not in SIXTEEN_BIT_MODES:
        return img
    oriented = ImageOps.exif_transpose(img)  # as load_image would (the 8-bit copy carries no EXIF)
    values = np.asarray(oriented).astype(np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")


def _as_inference_rgb(img: Image.Image) -> Image.Image:
    """What diffusers' ``load_image`` does to a PIL image: EXIF orientation applied, converted to RGB; 16-bit grey
    first scaled to 8 bits (:func:`to_8_bits`), the one rule for the encoder, training copies and training crops."""
    from diffusers.utils import load_image

    return load_image(to_8_bits(img))


def open_rgb(data: bytes) -> Image.Image:
    """Decode stored image bytes as a user's inference script would see them."""
    return _as_inference_rgb(Image.open(io.BytesIO(data)))


_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that transpose width and height


def open_lazy(data: bytes) -> Image.Image:
    """Open stored image bytes reading only the header: size and format known, no pixel decoded yet."""
    img = Image.open(io.BytesIO(data))
    img.size  # noqa: B018 - the header is parsed here, so a non-image fails now
    return img


def _orientation(img: Image.Image) -> int:
    if img.format == "PNG" and "exif" not in img.info:  # Pillow would decode the whole PNG to look further
        return 1
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: load_image would not rotate either
        return 1


def aspect_of(img: Image.Image) -> float:
    """Width / height as a user's inference script sees it (EXIF orientation applied), from the header."""
    w, h = img.size
    return h / w if _orientation(img) in _SWAPPING_ORIENTATIONS else w / h


def preload_decoders() -> None:
    """Import torchvision's decoders now (seconds, once): a DataLoader forked after this shares them."""
    import torchvision.io  # noqa: F401


def open_rgba(data: bytes) -> Image.Image:
    """Stored image bytes as RGBA (EXIF orientation applied, 16-bit grey scaled to 8 bits; opaque without alpha):
    what a family with an RGBA VAE sees."""
    img = Image.open(io.BytesIO(data))
    oriented = to_8_bits(img) if img.mode in SIXTEEN_BIT_MODES else ImageOps.exif_transpose(img)
    return oriented if oriented.mode == "RGBA" else oriented.convert("RGBA")


def _decode_uint8(img: Image.Image, data: bytes, draft_to: tuple[int, int] | None, channels: int = 3) -> torch.Tensor:
    """RGB uint8 [3, H, W] as ``open_rgb`` sees the image (EXIF orientation applied, alpha dropped); with
    ``channels`` 4, RGBA as :func:`open_rgba` sees it.

    JPEG and PNG (and WebP, GIF) decode through torchvision (libjpeg-turbo / libpng, no PIL
    copies); a JPEG that shrinks by 2× or more decodes at a reduced DCT scale through
    Pillow's ``draft`` instead; anything else (or a file torchvision refuses) through Pillow.
    """
    if channels == 4:
        return torch.from_numpy(np.array(open_rgba(data))).permute(2, 0, 1)
    if draft_to is None and img.format in ("JPEG", "PNG", "WEBP", "GIF"):
        from torchvision.io import ImageReadMode, decode_image

        try:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            pixels = decode_image(raw, ImageReadMode.RGB, apply_exif_orientation=True)
            if pixels.dtype == torch.uint8:  # a 16-bit PNG may come back as uint16, or fail: Pillow's rule then
                return pixels
        except Exception:  # noqa: BLE001 - an unusual variant (CMYK, 16-bit …): Pillow decides
            pass
        img = open_lazy(data)
    if draft_to is not None:
        img.draft("RGB", draft_to)
    rgb = _as_inference_rgb(img)
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def decode_and_crop(
    img: Image.Image, data: bytes, size: tuple[int, int], fraction: tuple[float, float], channels: int = 3
) -> torch.Tensor:
    """The crop of :func:`resize_and_crop` as a uint8 [3, h, w] tensor, with less decoding and SIMD resampling.

    ``img`` is ``open_lazy(data)`` (its header gives the size).  Decoding as in
    :func:`_decode_uint8`; the bicubic, antialiased resize runs on the uint8 tensor
    (PyTorch's vectorised uint8 kernel).  The result differs from the Pillow path by
    resampling noise only (tests/{unit,integration}/test_stream_order.py states the bound).
    """
    cw, ch = size
    swap = _orientation(img) in _SWAPPING_ORIENTATIONS
    w, h = (img.size[1], img.size[0]) if swap else img.size
    scale = max(cw / w, ch / h)
    draft = img.format == "JPEG" and scale <= 0.5 and channels == 3
    pixels = _decode_uint8(img, data, cover((w, h), size, swap) if draft else None, channels)
    h, w = pixels.shape[1:]  # the decoded (oriented, maybe reduced) size decides the resize
    rw, rh = cover((w, h), size, False)
    resized = torch.nn.functional.interpolate(pixels[None], size=(rh, rw), mode="bicubic", antialias=True)[0]
    x0, y0 = crop_offset((rw, rh), size, fraction)
    return resized[:, y0 : y0 + ch, x0 : x0 + cw]


def resize_and_crop(img: Image.Image, size: tuple[int, int], fraction: tuple[float, float]) -> Image.Image:
    """Scale so ``img`` covers ``size`` (short side first), then crop at ``fraction`` of the excess."""
    cw, ch = size
    rw, rh = cover(img.size, size, False)
    resized = img.resize((rw, rh), Image.Resampling.BICUBIC)
    x0, y0 = crop_offset((rw, rh), size, fraction)
    return resized.crop((x0, y0, x0 + cw, y0 + ch))
