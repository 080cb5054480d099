"""Contact sheets: rows of pictures with a caption under each row (sanity checks, previews)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] → PIL RGB."""
    array = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def contact_sheet(rows: list[tuple[list[Image.Image], str]], cell: int = 192, caption_height: int = 28) -> Image.Image:
    """Pictures of a row side by side (sources → target), the caption below them."""
    columns = max((len(pictures) for pictures, _ in rows), default=1)
    sheet = Image.new("RGB", (columns * (cell + 8) + 8, len(rows) * (cell + caption_height + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (pictures, caption) in enumerate(rows):
        y = 8 + r * (cell + caption_height + 8)
        for c, picture in enumerate(pictures):
            thumb = ImageOps.contain(picture.convert("RGB"), (cell, cell))
            sheet.paste(thumb, (8 + c * (cell + 8), y))
        draw.text((8, y + cell + 4), caption[:160], fill="black")
    return sheet
