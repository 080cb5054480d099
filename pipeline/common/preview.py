"""Contact sheets: rows of pictures with a caption under each row (sanity checks, previews)."""

from __future__ import annotations

import functools
import logging
import os
import re

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

log = logging.getLogger(__name__)


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """[3, H, W] uint8 pixels, or floats in [-1, 1] → PIL RGB."""
    if t.dtype != torch.uint8:
        t = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    array = t.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


# fonts with CJK glyphs on common systems; the first that exists and really has the glyphs is used
CJK_FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/wenquanyi/wqy-microhei/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Light.ttc",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/simsun.ttc",
)
LATIN_FALLBACK = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf")
FONT_ENV = "QWEN_EDIT_CAPTION_FONT"
CJK_PROBE = "中文字"


def has_glyphs(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> bool:
    """Whether ``font`` draws every character of ``text`` as its own glyph (not the missing-glyph box)."""

    def pixels(char: str) -> bytes:
        canvas = Image.new("L", (64, 64))
        ImageDraw.Draw(canvas).text((4, 4), char, font=font, fill=255)
        return canvas.tobytes()

    missing = pixels("\U0010fffd")  # a private-use code point: drawn as the .notdef box
    return all(any(p := pixels(char)) and p != missing for char in text)


def _fc_list_cjk() -> list[str]:
    """Font files fontconfig knows for Chinese (empty where fontconfig is not installed)."""
    import shutil
    import subprocess

    if shutil.which("fc-list") is None:
        return []
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(line.split(":")[0].strip() for line in out.splitlines() if line.strip())


@functools.cache
def caption_font(path: str | None = None, size: int = 14) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The caption font: ``path``, else ``$QWEN_EDIT_CAPTION_FONT``, else the first CJK-capable font found.

    Without one, Latin captions still render (DejaVu or Pillow's own font) and a
    warning says how to get CJK captions readable.
    """
    explicit = path or os.environ.get(FONT_ENV)
    if explicit:
        return ImageFont.truetype(explicit, size)  # a bad path is the user's error: raise
    for candidate in (*_fc_list_cjk(), *CJK_FONT_CANDIDATES):
        try:
            font = ImageFont.truetype(candidate, size)
        except OSError:
            continue
        if has_glyphs(font, CJK_PROBE):
            return font
    log.warning(
        "no font with Chinese glyphs found: CJK captions on contact sheets will show as boxes. Install one "
        "(e.g. apt install fonts-noto-cjk) or give --caption_font FILE / $%s",
        FONT_ENV,
    )
    for candidate in LATIN_FALLBACK:
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def wrap_caption(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """Lines of at most ``width`` pixels: words stay whole, CJK text (no spaces) breaks between characters."""
    lines, line = [], ""
    pieces = re.findall(r"\S+\s*|\s+", text.replace("\n", " "))
    for piece in pieces:
        for part in [piece] if draw.textlength(piece, font=font) <= width else list(piece):
            if line and draw.textlength(line + part, font=font) > width:
                lines.append(line.rstrip())
                line = part.lstrip()
            else:
                line += part
    if line.strip():
        lines.append(line.rstrip())
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], lines[max_lines - 1][:-1] + "…"]
    return lines


def contact_sheet(
    rows: list[tuple[list[Image.Image], str]],
    cell: int = 192,
    font_path: str | None = None,
    font_size: int = 14,
    caption_lines: int = 3,
) -> Image.Image:
    """Pictures of a row side by side (sources → result), the caption (wrapped, any script) below them."""
    font = caption_font(font_path, font_size)
    line_height = font_size + 4
    caption_height = caption_lines * line_height + 4
    columns = max((len(pictures) for pictures, _ in rows), default=1)
    width = max(columns * (cell + 8) + 8, 2 * cell + 24)  # room for a caption under a single picture
    sheet = Image.new("RGB", (width, len(rows) * (cell + caption_height + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (pictures, caption) in enumerate(rows):
        y = 8 + r * (cell + caption_height + 8)
        for c, picture in enumerate(pictures):
            thumb = ImageOps.contain(picture.convert("RGB"), (cell, cell))
            sheet.paste(thumb, (8 + c * (cell + 8), y))
        for k, line in enumerate(wrap_caption(draw, caption, font, width - 16, caption_lines)):
            draw.text((8, y + cell + 4 + k * line_height), line, fill="black", font=font)
    return sheet
