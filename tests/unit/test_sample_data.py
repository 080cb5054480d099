"""The sample data kit covers every input case and passes the project's own validator."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from pipeline.common.records import Record, read_records


def load_all(root):
    records = {}
    for jsonl in sorted(root.glob("*/data.jsonl")):
        parsed = list(read_records(str(jsonl)))
        assert all(isinstance(r, Record) for r in parsed), [r for r in parsed if not isinstance(r, Record)]
        records[jsonl.parent.name] = parsed
    return records


def test_covers_every_case(sample_data_dir):
    records = load_all(sample_data_dir)
    assert set(records) == {"edit_single", "compose_multi", "text_to_image"}
    every = [r for rs in records.values() for r in rs]
    counts = {r.num_sources for r in every}
    assert counts == {0, 1, 2, 3}
    singles = [r for r in every if r.num_sources == 1]
    assert any(r.inverse_instruction and r.inverse_instruction_cn for r in singles)
    assert any(not r.instruction_cn for r in singles), "some rows carry English only"
    assert all(r.instruction and r.instruction_cn for r in records["compose_multi"])
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in r.instruction_cn) for r in every)
    t2i_lines = (sample_data_dir / "text_to_image" / "data.jsonl").read_text(encoding="utf-8").splitlines()
    assert all('"source_image": null' in line for line in t2i_lines)

    paths = [p for r in every for p in (*r.sources, r.target)]
    assert {p.rsplit(".", 1)[1] for p in paths} == {"png", "jpg", "webp"}
    modes, aspects = set(), set()
    for p in paths:
        with Image.open(p) as img:
            img.load()
            modes.add(img.mode)
            aspects.add(round(img.width / img.height, 1))
    assert {"RGB", "RGBA", "P", "L"} <= modes
    assert min(aspects) <= 0.26 and max(aspects) >= 3.9


def _rgb(path):
    with Image.open(path) as img:
        return img.convert("RGB")


def test_edits_do_what_the_instruction_says(sample_data_dir):
    rows = load_all(sample_data_dir)["edit_single"]
    checked = set()
    for rec in rows:
        src, tgt = _rgb(rec.sources[0]), _rgb(rec.target)
        assert src.size == tgt.size
        s, t = np.asarray(src, dtype=np.float32), np.asarray(tgt, dtype=np.float32)
        edit = rec.extra["edit"]
        lossy = rec.target.endswith((".jpg", ".webp")) or rec.sources[0].endswith((".jpg", ".webp"))
        tol = 12.0 if lossy else 1.0
        if edit == "grayscale":
            assert np.abs(t[..., 0] - t[..., 1]).mean() < 3 and np.abs(s[..., 0] - s[..., 1]).mean() > 3
        elif edit in ("mirror", "upside_down"):
            moved = ImageOps.mirror(src) if edit == "mirror" else src.rotate(180)
            err_moved = np.abs(np.asarray(moved, dtype=np.float32) - t).mean()
            assert err_moved < tol and err_moved < np.abs(s - t).mean()
        elif edit == "brighter":
            assert t.mean() > s.mean() + 10
        elif edit == "red_dot":
            r = max(4, min(src.size) // 6)
            cy = cx = r // 2 + r
            assert t[cy, cx, 0] > 180 and t[cy, cx, 1] < 80
        elif edit == "blur":
            assert np.abs(np.diff(t, axis=1)).mean() < np.abs(np.diff(s, axis=1)).mean()
        checked.add(edit)
    assert checked == {"grayscale", "mirror", "upside_down", "brighter", "red_dot", "blur"}


def test_compose_target_contains_the_insets(sample_data_dir):
    for rec in load_all(sample_data_dir)["compose_multi"]:
        base, target = _rgb(rec.sources[0]), _rgb(rec.target)
        assert base.size == target.size
        assert np.abs(np.asarray(base, np.float32) - np.asarray(target, np.float32)).mean() > 1
        assert rec.instruction.count("picture") == rec.num_sources


def test_the_same_seed_writes_the_same_datasets(tmp_path):
    from pipeline.kit.sample_data import make_sample_data

    first = make_sample_data(tmp_path / "a", samples=2, seed=3)
    second = make_sample_data(tmp_path / "b", samples=2, seed=3)
    for task, jsonl in first.items():
        assert jsonl.read_text() == second[task].read_text()
        for image in sorted((jsonl.parent / "images").iterdir()):
            assert image.read_bytes() == (second[task].parent / "images" / image.name).read_bytes(), image.name
