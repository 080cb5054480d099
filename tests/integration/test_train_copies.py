"""Training copies (extract --train_copy_size): crops without decoding, the same pixels, originals only when needed."""

from __future__ import annotations

import io
import json

import numpy as np
from helpers import read_samples, run_module
from PIL import Image

from pipeline.common import images as imaging
from pipeline.shards import copies as copy_format
from pipeline.shards.format import COPY_PREFIX, npy_to_image


def test_extraction_stores_copies_after_the_originals_they_do_not_stand_for(copied):
    samples = read_samples(str(copied))
    with_copies = 0
    for members in samples.values():
        meta = json.loads(members["json"])
        for entry in [meta["target"], *meta["sources"]]:
            w, h = entry["size"]
            if "copy" not in entry:
                assert copy_format.train_copy(Image.new("RGB", (w, h)), 64) is None, entry
                continue
            with_copies += 1
            pixels = npy_to_image(members[entry["copy"]["member"]])
            assert [pixels.shape[1], pixels.shape[0]] == entry["copy"]["size"]
            assert pixels.shape[0] * pixels.shape[1] < w * h
            # the copy is the original shrunk as training at 64 shrinks it
            expected = copy_format.train_copy(imaging.open_rgb(members[entry["member"]]), 64)
            assert np.array_equal(pixels, expected)
        names = list(members)  # tar order: json, copies, then the originals that have copies
        for entry in [meta["target"], *meta["sources"]]:
            if "copy" in entry:
                assert names.index(entry["copy"]["member"]) < names.index(entry["member"])
    assert with_copies >= len(samples)
    manifest = json.loads((copied / "manifest.json").read_text())
    assert manifest["train_copy_size"] == 64
    assert json.loads(run_module("shards_tools", "verify", str(copied), "--json").stdout)["problems"] == []


def test_reshard_keeps_the_copies(copied, tmp_path):
    out = tmp_path / "resharded"
    run_module(
        "shards_tools", "reshard", str(copied), "--output_dir", str(out), "--max_samples_per_shard", "100",
    ).check_returncode()  # fmt: skip
    before, after = read_samples(str(copied)), read_samples(str(out))
    assert before.keys() == after.keys()
    for key, members in before.items():
        copies = {k for k in members if k.startswith(COPY_PREFIX)}
        assert copies and {k: after[key][k] for k in copies} == {k: members[k] for k in copies}
    assert json.loads(run_module("shards_tools", "verify", str(out), "--json").stdout)["problems"] == []


def test_reshard_adds_the_copies_extraction_would_have_written(copied, plain, tmp_path):
    assert not any(k.startswith(COPY_PREFIX) for m in read_samples(str(plain)).values() for k in m)
    out = tmp_path / "with-copies"
    run_module(
        "shards_tools", "reshard", str(plain), "--output_dir", str(out), "--train_copy_size", "64",
        "--max_samples_per_shard", "4",
    ).check_returncode()  # fmt: skip
    made, extracted = read_samples(str(out)), read_samples(str(copied))
    assert made.keys() == extracted.keys()
    for key, members in extracted.items():
        assert json.loads(made[key]["json"]) == json.loads(members["json"])
        for name in (k for k in members if k.startswith(COPY_PREFIX)):
            assert made[key][name] == members[name]
    assert json.loads((out / "manifest.json").read_text())["train_copy_size"] == 64
    assert json.loads(run_module("shards_tools", "verify", str(out), "--json").stdout)["problems"] == []


def test_convert_legacy_writes_the_copies_too(sample_data_dir, tmp_path):
    from legacy_outputs import original_output

    work = tmp_path / "work"
    original_output(work, sample_data_dir, "edit_single")
    out = tmp_path / "converted" / "edit_a"
    run_module(
        "shards_tools", "convert-legacy", str(work / "out_jsonl"), "--output_dir", str(out),
        "--train_copy_size", "64", "--max_samples_per_shard", "4",
    ).check_returncode()  # fmt: skip
    copies = 0
    for members in read_samples(str(out)).values():
        meta = json.loads(members["json"])
        for entry in [meta["target"], *meta["sources"]]:
            expected = copy_format.train_copy(imaging.open_rgb(members[entry["member"]]), 64)
            if expected is None:
                assert "copy" not in entry
                continue
            copies += 1
            assert np.array_equal(npy_to_image(members[entry["copy"]["member"]]), expected)
    assert copies >= 10
    assert json.loads((out / "manifest.json").read_text())["train_copy_size"] == 64
    assert json.loads(run_module("shards_tools", "verify", str(out), "--json").stdout)["problems"] == []


def test_verify_reports_a_copy_that_does_not_match_its_json(copied, tmp_path):
    import shutil
    import tarfile

    task = tmp_path / "damaged"
    shutil.copytree(copied, task)
    shard = sorted(task.rglob("*.tar"))[0]
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    name = next(m.name for m, _ in members if ".copy_" in m.name)
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if info.name == name:  # a copy of another size than the json says
                buf = io.BytesIO()
                np.save(buf, np.zeros((5, 7, 3), dtype=np.uint8), allow_pickle=False)
                data = buf.getvalue()
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    result = run_module("shards_tools", "verify", str(task), "--json")
    assert result.returncode == 1
    problems = json.loads(result.stdout)["problems"]
    assert any("is 7x5, the json says" in p["problem"] for p in problems), problems
