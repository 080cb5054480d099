"""shards_tools: inspect, stats, verify (with every kind of damage), preview, convert-legacy, reshard."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_samples, run_module
from PIL import Image

from pipeline.shards.format import npy_to_embedding

# integration: subprocess runs of the real CLIs on the tiny model (servers, torchrun, SIGKILL)
pytestmark = pytest.mark.slow


def tool(*args: str, env=None, expect: int = 0):
    result = run_module("shards_tools", *args, env=env)
    assert result.returncode == expect, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    return result


def tool_json(*args: str, env=None, expect: int = 0):
    return json.loads(tool(*args, "--json", env=env, expect=expect).stdout)


@pytest.fixture
def task_copy(meta_dir, tmp_path):
    """A private copy of the extracted edit task, free to damage."""
    dst = tmp_path / "meta" / "edit_single"
    shutil.copytree(meta_dir / "edit_single", dst)
    return dst


def test_inspect_and_stats(meta_dir):
    rows = tool_json("inspect", str(meta_dir / "edit_single"), "--limit", "5")["samples"]
    assert len(rows) == 5
    assert all(r["num_sources"] == 1 and len(r["sizes"]) == 2 and r["variants"] and r["instruction"] for r in rows)
    text = tool("inspect", str(sorted((meta_dir / "compose_multi" / "src3").glob("*.tar"))[0])).stdout
    assert "N=3" in text and "bucket=" in text and "Place picture 2" in text

    stats = tool_json("stats", str(meta_dir))["rows"]
    by = {(r["task"], r["num_sources"]): r for r in stats}
    assert set(by) == {("edit_single", 1), ("compose_multi", 2), ("compose_multi", 3), ("text_to_image", 0)}
    assert by[("edit_single", 1)]["samples"] == 12 and by[("edit_single", 1)]["shards"] == 4
    assert set(by[("edit_single", 1)]["variants"]) == {"en", "cn", "drop", "en_inv", "cn_inv", "drop_inv"}
    assert by[("text_to_image", 0)]["aspect_buckets"] >= 3
    assert "compose_multi" in tool("stats", str(meta_dir)).stdout


def test_verify_passes_on_good_data(meta_dir):
    report = tool_json("verify", str(meta_dir))
    assert report["problems"] == [] and report["samples"] == 36 and report["tasks"] == 3


def _rewrite_tar(path: Path, mutate) -> None:
    with tarfile.open(path) as tin:
        members = [(m, tin.extractfile(m).read()) for m in tin]
    members = mutate(members)
    with tarfile.open(path, "w") as tout:
        for info, data in members:
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_verify_reports_each_problem_with_shard_and_key(task_copy):
    shards = sorted((task_copy / "src1").glob("*.tar"))
    # 1) a flipped byte inside an image: sha256 and decoding fail
    data = bytearray(shards[0].read_bytes())
    index = json.loads(shards[0].with_name(shards[0].name.replace(".tar", ".index.json")).read_text())["samples"]
    first = index[0]
    target_member = next(ext for ext in first["members"] if ext.startswith("target."))
    off, size = first["members"][target_member]
    data[off : off + 16] = b"\x00" * 16  # the image's magic bytes
    shards[0].write_bytes(bytes(data))

    # 2) a pickle member and a duplicate key in the second shard
    def add_evil(members):
        info = tarfile.TarInfo(members[0][0].name.split(".")[0] + ".pyd")
        dup = [(tarfile.TarInfo(m.name), d) for m, d in members if m.name.startswith(members[0][0].name.split(".")[0])]
        dup_key = index[0]["key"]
        dup = [(tarfile.TarInfo(dup_key + "." + m.name.split(".", 1)[1]), d) for m, d in dup]
        return members + [(info, b"cos\nsystem\n(S'echo x'\ntR.")] + dup

    _rewrite_tar(shards[1], add_evil)

    # 3) an embedding with the wrong hidden size in the third shard
    def wrong_hidden(members):
        out = []
        for m, d in members:
            if m.name.endswith(".emb_en.npy"):
                buf = io.BytesIO()
                np.save(buf, np.zeros((5, 32), dtype="<u2"), allow_pickle=False)
                d = buf.getvalue()
            out.append((m, d))
        return out

    _rewrite_tar(shards[2], wrong_hidden)
    # 4) a missing shard
    shards[3].unlink()
    report = tool_json("verify", str(task_copy), expect=1)
    problems = report["problems"]
    text = "\n".join(f"{p['shard']} {p['key']} {p['problem']}" for p in problems)

    def has(shard, key, words):
        return any(
            p["shard"] == f"src1/{shard.name}" and (key is None or p["key"] == key) and words in p["problem"]
            for p in problems
        )

    assert has(shards[0], None, "sha256"), text
    assert has(shards[0], first["key"], "does not decode"), text
    assert has(shards[1], None, "pickle-capable member"), text
    assert has(shards[1], first["key"], "duplicate key"), text
    assert any(p["shard"] == f"src1/{shards[2].name}" and "[seq, 64]" in p["problem"] for p in problems), text
    assert has(shards[3], None, "missing"), text
    human = tool("verify", str(task_copy), expect=1).stdout
    assert "problem(s)" in human and shards[1].name in human


def test_preview_writes_a_contact_sheet(meta_dir, tmp_path):
    out = tmp_path / "sheet.png"
    tool("preview", str(meta_dir / "compose_multi"), "--out", str(out), "--samples", "4")
    with Image.open(out) as sheet:
        assert sheet.width > 3 * 192 and sheet.height > 4 * 192
        # not a blank page: real pixels in the first row
        crop = np.asarray(sheet.convert("L").crop((8, 8, 200, 200)))
        assert crop.std() > 5


def _legacy_layout(root: Path, sample_data_dir: Path) -> tuple[Path, dict]:
    """The original tool's output: per-rank JSONL lines pointing at .pt embeddings and images."""
    meta = root / "legacy_meta"
    (meta / "rank0").mkdir(parents=True)
    (root / "emb").mkdir()
    rows_src = [json.loads(x) for x in (sample_data_dir / "edit_single" / "data.jsonl").read_text().splitlines()]
    t2i_src = [json.loads(x) for x in (sample_data_dir / "text_to_image" / "data.jsonl").read_text().splitlines()]
    expected, lines = {}, []
    gen = torch.Generator().manual_seed(0)
    for i, row in enumerate(rows_src[:5] + t2i_src[:2]):
        base = sample_data_dir / ("edit_single" if i < 5 else "text_to_image")
        out = {
            "source_image": str(base / row["source_image"]) if row["source_image"] else None,
            "edit_image": str(base / row["target_image"]),
            "instruction": row.get("instruction", ""),
            "instruction_cn": row.get("instruction_cn", ""),
            "inverse_instruction": row.get("inverse_instruction", ""),
            "inverse_instruction_cn": row.get("inverse_instruction_cn", ""),
            "source_image_size": [1, 1],
            "edit_image_size": [1, 1],
        }
        fields = ["en", "cn", "droptext"] + (["en_inv", "cn_inv", "droptext_inv"] if i < 5 else [])
        for f in fields:
            t = torch.randn(1, 10 + i, 64, generator=gen).to(torch.bfloat16)
            path = root / "emb" / f"{i}_{f}.pt"
            torch.save(t, path)
            out[f"embeddings_tensor_{f}"] = str(path)
            expected[(i, f)] = t[0]
        lines.append(out)
    lines[2]["embeddings_tensor_cn"] = str(root / "emb" / "gone.pt")  # a missing file -> failures
    (meta / "rank0" / "part.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    return meta, expected


def test_convert_legacy_keeps_every_tensor(sample_data_dir, tmp_path):
    meta, expected = _legacy_layout(tmp_path, sample_data_dir)
    out = tmp_path / "converted"
    manifest = tool_json(  # 1 line of 7 fails on purpose: above the default ratio 0.05, which would exit 1
        "convert-legacy",
        str(meta),
        "--output_dir",
        str(out),
        "--max_samples_per_shard",
        "2",
        "--max_failure_ratio",
        "0.2",
    )
    assert manifest["samples"] == 6 and manifest["failures"] == 1
    failure = json.loads((out / "_failures" / "rank-0.jsonl").read_text().splitlines()[0])
    assert failure["line"] == 2 and failure["kind"] == "missing_embedding"
    samples = read_samples(str(out))
    names = {
        "en": "en",
        "cn": "cn",
        "drop": "droptext",
        "en_inv": "en_inv",
        "cn_inv": "cn_inv",
        "drop_inv": "droptext_inv",
    }
    checked = 0
    for sample in samples.values():
        meta_json = json.loads(sample["json"])
        line = meta_json["line"]
        for variant in meta_json["variants"]:
            assert torch.equal(npy_to_embedding(sample[f"emb_{variant}.npy"]), expected[(line, names[variant])])
            checked += 1
        if meta_json["num_sources"] == 0:
            assert "drop" not in meta_json["variants"]
    assert checked == 4 * 6 + 2 * 2
    null = npy_to_embedding((out / "null_embedding.npy").read_bytes())
    assert torch.equal(null, expected[(5, "droptext")])
    assert tool_json("verify", str(out))["problems"] == []


def test_reshard_merges_and_verify_passes(meta_dir, tmp_path):
    out = tmp_path / "merged" / "edit_single"
    manifest = tool_json(
        "reshard", str(meta_dir / "edit_single"), "--output_dir", str(out), "--max_samples_per_shard", "5"
    )
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 2]
    assert tool_json("verify", str(out))["problems"] == []
    before, after = read_samples(str(meta_dir / "edit_single")), read_samples(str(out))
    assert before.keys() == after.keys()
    assert all(before[k][m] == after[k][m] for k in before for m in before[k])
    split = tmp_path / "split" / "edit_single"
    assert (
        len(tool_json("reshard", str(out), "--output_dir", str(split), "--max_samples_per_shard", "1")["shards"]) == 12
    )
    rerun = tool_json("reshard", str(out), "--output_dir", str(split), "--max_samples_per_shard", "1")
    assert len(rerun["shards"]) == 12, "the same command again resumes: nothing copied twice"
    tool("reshard", str(out), "--output_dir", str(split), "--max_samples_per_shard", "2", expect=2)  # other flags


def test_tools_work_on_object_stores(meta_dir, object_store):
    store, env = object_store, object_store.env
    store.filesystem().put(str(meta_dir / "compose_multi"), f"{store.bucket}/tools/compose_multi", recursive=True)
    url = store.url("tools", "compose_multi")
    assert tool_json("verify", url, env=env)["samples"] == 12
    assert {r["num_sources"] for r in tool_json("stats", url, env=env)["rows"]} == {2, 3}
    assert len(tool_json("inspect", url, "--limit", "3", env=env)["samples"]) == 3
    out = store.url("tools", "resharded")
    assert tool_json("reshard", url, "--output_dir", out, "--max_samples_per_shard", "4", env=env)["samples"] == 12
    assert tool_json("verify", out, env=env)["problems"] == []
