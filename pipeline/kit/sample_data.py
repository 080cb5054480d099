"""Sample data kit: small, real, describable editing data in the input JSONL format.

Each task folder holds ``images/`` and ``data.jsonl``.  Edits are actual image
operations whose instruction says what changed (grayscale, mirror, a red dot
added, brightness, pasting picture 2 into picture 1 ...), so a person can check
a target against its instruction.  Base pictures are the photographs matplotlib
ships in its wheel when it is installed, plus seeded drawn scenes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

# Aspect ratios (w/h) cycled through; the extremes come first so even small
# datasets cover 1:4 and 4:1.
ASPECTS = (1 / 4, 4.0, 1.0, 1 / 2, 2.0, 3 / 4, 4 / 3, 1 / 3, 3.0)
FORMATS = ("png", "jpg", "webp")
SOURCE_MODES = ("RGB", "RGBA", "P", "L")
BASE_AREA = 160 * 160
PHOTO_FILES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")

COLORS = {
    "red": ((220, 30, 30), "红色"),
    "green": ((40, 170, 60), "绿色"),
    "blue": ((40, 80, 220), "蓝色"),
    "yellow": ((240, 210, 40), "黄色"),
    "white": ((245, 245, 245), "白色"),
    "black": ((15, 15, 15), "黑色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}


def photographs() -> list[Image.Image]:
    """Real photographs from matplotlib's bundled sample data, if it is installed."""
    try:
        from matplotlib import cbook
    except ImportError:
        return []
    photos = []
    for name in PHOTO_FILES:
        with Image.open(cbook.get_sample_data(name, asfileobj=False)) as img:
            photos.append(img.convert("RGB"))
    return photos


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def drawn_scene(rng: random.Random, size: tuple[int, int] = (320, 320)) -> Image.Image:
    """A gradient background with a few coloured shapes."""
    w, h = size
    top = [rng.randrange(256) for _ in range(3)]
    bottom = [rng.randrange(256) for _ in range(3)]
    # diagonal gradient, so mirroring and rotating change every crop visibly
    ramp = Image.linear_gradient("L")
    mask = Image.blend(ramp, ramp.rotate(90), 0.5).resize(size)
    img = Image.composite(Image.new("RGB", size, tuple(bottom)), Image.new("RGB", size, tuple(top)), mask)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 4)):
        cx, cy, r = rng.randrange(w), rng.randrange(h), rng.randint(w // 10, w // 4)
        color = COLORS[rng.choice(list(COLORS))][0]
        draw_shape(draw, rng.choice(list(SHAPES)), (cx - r, cy - r, cx + r, cy + r), color)
    return img


def crop_to_aspect(img: Image.Image, aspect: float, rng: random.Random, area: int = BASE_AREA) -> Image.Image:
    """A random crop of ``img`` with width/height ``aspect``, resized to about ``area`` pixels."""
    w, h = img.size
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    cw, ch = min(cw, w), min(ch, h)
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out_w = max(16, round((area * aspect) ** 0.5))
    out_h = max(16, round(out_w / aspect))
    return img.crop((x0, y0, x0 + cw, y0 + ch)).resize((out_w, out_h), Image.Resampling.LANCZOS)


def with_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert to one of the modes users' data arrive in (alpha fades left to right)."""
    if mode == "RGBA":
        rgba = img.convert("RGBA")
        alpha = Image.linear_gradient("L").rotate(90).resize(img.size)
        rgba.putalpha(ImageOps.invert(alpha).point(lambda v: 96 + v * 159 // 255))
        return rgba
    if mode == "P":
        return img.convert("RGB").quantize(colors=64)
    return img.convert(mode)


def save_image(img: Image.Image, folder: Path, stem: str, fmt: str) -> str:
    """Save in ``fmt`` (PNG when JPEG cannot hold the mode); return the file name."""
    if fmt == "jpg" and img.mode not in ("RGB", "L"):
        fmt = "png"
    name = f"{stem}.{fmt}"
    params: dict[str, Any] = {"quality": 92} if fmt in ("jpg", "webp") else {}
    if fmt == "webp" and img.mode == "P":
        img = img.convert("RGBA")
    img.save(folder / name, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], **params)
    return name


@dataclass(frozen=True)
class SingleEdit:
    """An operation on one image and the words for it, both directions."""

    name: str
    apply: Callable[[Image.Image], Image.Image]
    en: str
    cn: str
    inverse_en: str
    inverse_cn: str


def _add_dot(img: Image.Image) -> Image.Image:
    out = img.convert("RGB").copy()
    w, h = out.size
    r = max(4, min(w, h) // 6)
    ImageDraw.Draw(out).ellipse((r // 2, r // 2, r // 2 + 2 * r, r // 2 + 2 * r), fill=COLORS["red"][0])
    return out


SINGLE_EDITS = (
    SingleEdit(
        "grayscale",
        lambda im: ImageOps.grayscale(im.convert("RGB")).convert("RGB"),
        "Turn the photo black and white.",
        "把照片变成黑白。",
        "Restore the original colors of the photo.",
        "恢复照片原来的颜色。",
    ),
    SingleEdit(
        "mirror",
        lambda im: ImageOps.mirror(im.convert("RGB")),
        "Flip the image horizontally.",
        "将图片水平翻转。",
        "Flip the image horizontally back.",
        "把图片水平翻转回来。",
    ),
    SingleEdit(
        "red_dot",
        _add_dot,
        "Add a red circle in the top-left corner.",
        "在左上角加一个红色圆形。",
        "Remove the red circle from the top-left corner.",
        "删除左上角的红色圆形。",
    ),
    SingleEdit(
        "brighter",
        lambda im: ImageEnhance.Brightness(im.convert("RGB")).enhance(1.6),
        "Make the image much brighter.",
        "把图片调亮很多。",
        "Make the image darker.",
        "把图片调暗。",
    ),
    SingleEdit(
        "blur",
        lambda im: im.convert("RGB").filter(ImageFilter.GaussianBlur(3)),
        "Blur the whole image.",
        "把整张图片变模糊。",
        "Sharpen the image.",
        "让图片变清晰。",
    ),
    SingleEdit(
        "upside_down",
        lambda im: im.convert("RGB").rotate(180),
        "Turn the image upside down.",
        "把图片上下颠倒。",
        "Turn the image upside down again.",
        "再把图片上下颠倒过来。",
    ),
)

CORNERS = {
    "top-left": ("左上角", lambda W, H, w, h: (0, 0)),
    "top-right": ("右上角", lambda W, H, w, h: (W - w, 0)),
    "bottom-left": ("左下角", lambda W, H, w, h: (0, H - h)),
    "bottom-right": ("右下角", lambda W, H, w, h: (W - w, H - h)),
}


def paste_corner(base: Image.Image, inset: Image.Image, corner: str) -> Image.Image:
    """``inset`` scaled to a third of ``base`` and pasted at ``corner``."""
    out = base.convert("RGB").copy()
    W, H = out.size
    scale = min(W / 3 / inset.width, H / 3 / inset.height)
    small = inset.convert("RGB").resize((max(1, round(inset.width * scale)), max(1, round(inset.height * scale))))
    out.paste(small, CORNERS[corner][1](W, H, small.width, small.height))
    return out


class _Maker:
    """Shared state while one dataset is written: RNG, base pictures, counters."""

    def __init__(self, out_dir: Path, seed: int):
        self.out_dir = out_dir
        self.rng = random.Random(seed)
        self.photos = photographs()
        self.counter = 0

    def base(self) -> Image.Image:
        self.counter += 1
        aspect = ASPECTS[(self.counter - 1) % len(ASPECTS)]
        if self.photos and self.counter % 2:
            picture = self.photos[(self.counter // 2) % len(self.photos)]
        else:
            picture = drawn_scene(self.rng)
        return crop_to_aspect(picture, aspect, self.rng)

    def fmt(self) -> str:
        return FORMATS[self.counter % len(FORMATS)]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _single_edit_task(mk: _Maker, folder: Path, samples: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(samples):
        edit = SINGLE_EDITS[i % len(SINGLE_EDITS)]
        src = with_mode(mk.base(), SOURCE_MODES[i % len(SOURCE_MODES)])
        target = edit.apply(src)  # from the stored source, so grayscale/palette sources stay consistent
        src_file = save_image(src, folder, f"{i:04d}_src", mk.fmt())
        tgt_file = save_image(target, folder, f"{i:04d}_tgt", FORMATS[(i + 1) % len(FORMATS)])
        row: dict[str, Any] = {
            "source_image": f"images/{src_file}",
            "target_image": f"images/{tgt_file}",
            "instruction": edit.en,
            "instruction_cn": edit.cn,
            "inverse_instruction": edit.inverse_en,
            "inverse_instruction_cn": edit.inverse_cn,
            "edit": edit.name,
        }
        if i % 5 == 4:  # some rows carry English only and no inverse text
            for key in ("instruction_cn", "inverse_instruction", "inverse_instruction_cn"):
                del row[key]
        rows.append(row)
    return rows


def _multi_source_task(mk: _Maker, folder: Path, samples: int) -> list[dict[str, Any]]:
    rows = []
    corner_names = list(CORNERS)
    for i in range(samples):
        n = 2 + i % 2
        sources = [with_mode(mk.base(), SOURCE_MODES[(i + k) % len(SOURCE_MODES)]) for k in range(n)]
        corners = [corner_names[(i + k) % 4] for k in range(n - 1)]
        target = sources[0]
        for inset, corner in zip(sources[1:], corners, strict=True):
            target = paste_corner(target, inset, corner)
        files = [
            save_image(img, folder, f"{i:04d}_src{k}", FORMATS[(i + k) % len(FORMATS)]) for k, img in enumerate(sources)
        ]
        en = " and ".join(f"picture {k + 2} in the {c} corner" for k, c in enumerate(corners))
        cn = "，".join(f"把图{k + 2}放到图1的{CORNERS[c][0]}" for k, c in enumerate(corners))
        rows.append(
            {
                "source_image": [f"images/{f}" for f in files],
                "target_image": f"images/{save_image(target, folder, f'{i:04d}_tgt', mk.fmt())}",
                "instruction": f"Place {en} of picture 1.",
                "instruction_cn": f"{cn}。",
            }
        )
    return rows


def _text_to_image_task(mk: _Maker, folder: Path, samples: int) -> list[dict[str, Any]]:
    rows = []
    color_names, shape_names = list(COLORS), list(SHAPES)
    for i in range(samples):
        fg, bg = color_names[i % len(color_names)], color_names[(i + 2) % len(color_names)]
        shape = shape_names[i % len(shape_names)]
        aspect = ASPECTS[i % len(ASPECTS)]
        w = round((BASE_AREA * aspect) ** 0.5)
        h = round(w / aspect)
        img = Image.new("RGB", (w, h), COLORS[bg][0])
        r = min(w, h) // 3
        draw_shape(ImageDraw.Draw(img), shape, (w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r), COLORS[fg][0])
        rows.append(
            {
                "source_image": None,
                "target_image": f"images/{save_image(img, folder, f'{i:04d}_tgt', FORMATS[i % len(FORMATS)])}",
                "instruction": f"A {fg} {shape} in the middle of a {bg} background.",
                "instruction_cn": f"{COLORS[bg][1]}背景中间有一个{COLORS[fg][1]}{SHAPES[shape]}。",
            }
        )
    return rows


TASKS = {
    "edit_single": _single_edit_task,
    "compose_multi": _multi_source_task,
    "text_to_image": _text_to_image_task,
}


def make_sample_data(out_dir: str | Path, samples: int = 12, seed: int = 0) -> dict[str, Path]:
    """Write every task folder under ``out_dir``; returns task name → JSONL path."""
    out = Path(out_dir)
    mk = _Maker(out, seed)
    written = {}
    for task, build in TASKS.items():
        images = out / task / "images"
        images.mkdir(parents=True, exist_ok=True)
        rows = build(mk, images, samples)
        jsonl = out / task / "data.jsonl"
        _write_jsonl(jsonl, rows)
        written[task] = jsonl
    return written


def combined_jsonl(data_dir: str | Path, out: str | Path, tasks: tuple[str, ...] = tuple(TASKS)) -> Path:
    """One JSONL with the rows of several task folders, image paths made absolute (benchmarks, tests)."""
    from pipeline.common.records import parse_line

    lines = []
    for task in tasks:
        jsonl = Path(data_dir) / task / "data.jsonl"
        for number, text in enumerate(jsonl.read_text(encoding="utf-8").splitlines()):
            rec = parse_line(text, str(jsonl), number)
            row = json.loads(text)
            row["source_image"] = list(rec.sources) or None
            row["target_image"] = rec.target
            lines.append(json.dumps(row, ensure_ascii=False))
    out = Path(out)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
