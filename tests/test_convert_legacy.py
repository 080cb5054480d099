"""convert-legacy on the original tool's real output layouts (issue 13, items 1-3).

The layouts are built as the original extraction writes them: run from a
working folder with ``--output_jsonl_dir out_jsonl --embeddings_save_dir
embeddings``, it leaves ``out_jsonl/{stem}_rank_{r:03d}.jsonl`` (lines in any
order) and ``embeddings/{stem}/{input line}_{variant}.pt``, the paths inside the
lines relative to that working folder; text-to-image runs (``--t2i_mode``)
store only ``en``/``cn``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, read_samples, run_module
from PIL import Image

from pipeline.shards.format import npy_to_embedding
from shards_tools.convert import ConvertOptions, convert_legacy
from shards_tools.verify import verify

HIDDEN = 64
SUFFIXES = ("en", "cn", "droptext", "en_inv", "cn_inv", "droptext_inv")
VARIANT_OF = {
    "en": "en",
    "cn": "cn",
    "droptext": "drop",
    "en_inv": "en_inv",
    "cn_inv": "cn_inv",
    "droptext_inv": "drop_inv",
}


def original_output(
    work: Path, sample_data_dir: Path, task: str, *, ranks: int = 2, t2i: bool = False, copies: int = 1, seed: int = 0
) -> dict[tuple[str, int, str], torch.Tensor]:
    """Write what the original extraction leaves in ``work``; returns {(rank file, line in it, suffix): tensor}."""
    rows = [json.loads(x) for x in (sample_data_dir / task / "data.jsonl").read_text().splitlines()] * copies
    (work / "images").mkdir(parents=True, exist_ok=True)
    (work / "out_jsonl").mkdir(exist_ok=True)
    (work / "embeddings" / "data").mkdir(parents=True, exist_ok=True)

    def local(ref: str) -> str:  # the input's images, copied under the working folder, referenced relatively
        name = f"{task}_{Path(ref).name}"
        if not (work / "images" / name).exists():
            shutil.copy(sample_data_dir / task / ref, work / "images" / name)
        return f"images/{name}"

    gen, order = torch.Generator().manual_seed(seed), random.Random(seed)
    per_rank: dict[int, list[tuple[int, dict]]] = {r: [] for r in range(ranks)}
    for lineno, row in enumerate(rows):
        src = row.get("source_image")
        sources = [] if src is None else [src] if isinstance(src, str) else list(src)
        line = {
            "source_image": None if not sources else [local(s) for s in sources] if len(sources) > 1 else local(src),
            "edit_image": local(row["target_image"]),
            **{k: row.get(k, "") for k in ("instruction", "instruction_cn", "inverse_instruction")},
            "source_image_size": [
                dict(zip(("width", "height"), Image.open(sample_data_dir / task / s).size, strict=True))
                for s in sources
            ],
            "edit_image_size": dict(
                zip(("width", "height"), Image.open(sample_data_dir / task / row["target_image"]).size, strict=True)
            ),
        }
        suffixes = SUFFIXES[:2] if t2i else SUFFIXES[:3] + (SUFFIXES[3:] if len(sources) == 1 else ())
        for suffix in suffixes:
            path = f"embeddings/data/{lineno}_{suffix}.pt"
            torch.save(torch.randn(7 + lineno % 5, HIDDEN, generator=gen).to(torch.bfloat16), work / path)
            line[f"embeddings_tensor_{suffix}"] = path
        per_rank[lineno % ranks].append((lineno, line))
    expected = {}
    for rank, lines in per_rank.items():
        order.shuffle(lines)  # the original's DataLoader shuffles: output order is not input order
        name = f"data_rank_{rank:03d}.jsonl"
        (work / "out_jsonl" / name).write_text(
            "".join(json.dumps(line, ensure_ascii=False) + "\n" for _, line in lines)
        )
        for number, (_, line) in enumerate(lines):
            for key, path in line.items():
                if key.startswith("embeddings_tensor_"):
                    expected[(name, number, key[len("embeddings_tensor_") :])] = torch.load(
                        work / path, weights_only=True
                    )
    return expected


def assert_every_tensor_kept(out: Path, expected: dict, rank_files: list[str]) -> int:
    checked = 0
    for sample in read_samples(str(out)).values():
        meta = json.loads(sample["json"])
        name = Path(meta["input"]).name
        assert name in rank_files
        for suffix in SUFFIXES:
            want = expected.get((name, meta["line"], suffix))
            variant = VARIANT_OF[suffix]
            if want is None or (variant == "drop" and meta["num_sources"] == 0):
                assert variant not in meta["variants"]
                continue
            assert torch.equal(npy_to_embedding(sample[f"emb_{variant}.npy"]), want)  # bit-identical
            checked += 1
    return checked


def test_output_jsonl_dir_with_sibling_embeddings_and_images(sample_data_dir, tmp_path):
    """Issue's crash: JSONLs at the top of the folder, embeddings/ and images/ beside it, relative paths."""
    work = tmp_path / "work"
    expected = original_output(work, sample_data_dir, "edit_single")
    # one line whose .pt is gone, one whose hidden size differs: both recorded, the rest converted
    broken = json.loads((work / "out_jsonl" / "data_rank_001.jsonl").read_text().splitlines()[3])
    os.remove(work / broken["embeddings_tensor_cn"])
    odd = (
        work
        / json.loads((work / "out_jsonl" / "data_rank_000.jsonl").read_text().splitlines()[1])["embeddings_tensor_en"]
    )
    torch.save(torch.zeros(3, HIDDEN // 2, dtype=torch.bfloat16), odd)

    out = tmp_path / "shards" / "edit_a"
    result = convert_legacy(str(work / "out_jsonl"), str(out), None, ConvertOptions(max_samples_per_shard=4))
    assert result["layout"] == "task" and result["refused"] == {}
    manifest = result["tasks"]["edit_a"]
    assert manifest["samples"] == 10 and manifest["failures"] == 2
    assert manifest["failures_by_reason"] == {"bad_embedding": 1, "missing_embedding": 1}
    del expected[("data_rank_001.jsonl", 3, "cn")], expected[("data_rank_000.jsonl", 1, "en")]
    kept = {
        k: v
        for k, v in expected.items()
        if (k[0], k[1]) not in {("data_rank_001.jsonl", 3), ("data_rank_000.jsonl", 1)}
    }
    assert assert_every_tensor_kept(out, kept, ["data_rank_000.jsonl", "data_rank_001.jsonl"]) == len(kept) == 10 * 6
    assert manifest["prompt_style"] == "firered" and manifest["embedding"]["hidden_size"] == HIDDEN
    summary, problems = verify(str(out), None)
    assert problems == [] and summary["samples"] == 10


def test_a_rerun_resumes_and_other_input_is_refused(sample_data_dir, tmp_path):
    work = tmp_path / "work"
    original_output(work, sample_data_dir, "edit_single")
    out = tmp_path / "edit_a"
    first = convert_legacy(str(work / "out_jsonl"), str(out), None, ConvertOptions(max_samples_per_shard=5))
    again = convert_legacy(str(work / "out_jsonl"), str(out), None, ConvertOptions(max_samples_per_shard=5))
    assert again["tasks"]["edit_a"]["shards"] == first["tasks"]["edit_a"]["shards"]  # nothing converted twice
    (work / "out_jsonl" / "data_rank_002.jsonl").write_text("")
    with pytest.raises(FileExistsError, match=r"other input or flags \(inputs: "):
        convert_legacy(str(work / "out_jsonl"), str(out), None, ConvertOptions(max_samples_per_shard=5))


def test_a_rerun_with_another_train_copy_size_is_refused(sample_data_dir, tmp_path):
    work = tmp_path / "work"
    original_output(work, sample_data_dir, "edit_single", ranks=1)
    out = tmp_path / "edit_c"
    convert_legacy(str(work / "out_jsonl"), str(out), None, ConvertOptions(train_copy_size=64))
    with pytest.raises(FileExistsError, match="train_copy_size: 64 then, 32 now"):
        convert_legacy(str(work / "out_jsonl"), str(out), None, ConvertOptions(train_copy_size=32))
    with pytest.raises(FileExistsError, match="train_copy_size: 64 then, None now"):
        convert_legacy(str(work / "out_jsonl"), str(out), None, ConvertOptions())


def test_npy_embedding_paths_are_read_as_npy(sample_data_dir, tmp_path):
    """A legacy line may point at .npy files (ours, or plain float arrays): read with allow_pickle=False."""
    from pipeline.shards.format import embedding_to_npy

    work = tmp_path / "work"
    expected = original_output(work, sample_data_dir, "edit_single", ranks=1)
    jsonl = work / "out_jsonl" / "data_rank_000.jsonl"
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    for number, line in enumerate(lines):
        for key in [k for k in line if k.startswith("embeddings_tensor_")]:
            tensor = expected[("data_rank_000.jsonl", number, key[len("embeddings_tensor_") :])]
            npy = (work / line[key]).with_suffix(".npy")
            if number % 2:  # our bf16 bit pattern
                npy.write_bytes(embedding_to_npy(tensor))
            else:  # a plain float32 array, as other tools write
                np.save(npy, tensor.float().numpy(), allow_pickle=False)
            line[key] = str(Path(line[key]).with_suffix(".npy"))
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "from_npy"
    manifest = convert_legacy(str(work / "out_jsonl"), str(out), None, ConvertOptions())["tasks"]["from_npy"]
    assert manifest["failures"] == 0 and manifest["samples"] == len(lines)
    assert assert_every_tensor_kept(out, expected, ["data_rank_000.jsonl"]) == 6 * len(lines)


@pytest.mark.slow
def test_the_writers_share_one_failure_policy(sample_data_dir, tmp_path):
    """convert-legacy with 7 of 8 lines failed exits 1 like extraction (--max_failure_ratio 0.05); under the ratio,
    or with the ratio raised, it exits 0; the failures are recorded either way."""
    work = tmp_path / "work"
    original_output(work, sample_data_dir, "edit_single", ranks=1)
    jsonl = work / "out_jsonl" / "data_rank_000.jsonl"
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()][:8]
    for line in lines[1:]:
        line["embeddings_tensor_en"] = "embeddings/data/gone.pt"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["convert-legacy", str(work / "out_jsonl"), "--json"]
    failed = run_module("shards_tools", *args, "--output_dir", str(tmp_path / "a"))
    assert failed.returncode == 1 and "above --max_failure_ratio 5.0%" in failed.stderr
    assert json.loads(failed.stdout)["failures"] == 7
    allowed = run_module("shards_tools", *args, "--output_dir", str(tmp_path / "b"), "--max_failure_ratio", "0.9")
    assert allowed.returncode == 0, allowed.stderr[-2000:]


@pytest.mark.slow
def test_a_killed_conversion_resumes_to_the_same_result(sample_data_dir, tmp_path):
    work = tmp_path / "work"
    original_output(work, sample_data_dir, "edit_single", ranks=1, copies=6)
    args = [str(work / "out_jsonl"), "--max_samples_per_shard", "3", "--json"]
    whole = tmp_path / "whole"
    run_module("shards_tools", "convert-legacy", *args, "--output_dir", str(whole), check=True)

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "shards_tools", "convert-legacy", *args, "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "_progress").glob("rank-*/*.json")) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the conversion finished before it could be killed"
    committed = len(list((out / "_progress").glob("rank-*/*.json")))
    assert 1 <= committed < 24

    result = run_module("shards_tools", "convert-legacy", *args, "--output_dir", str(out), check=True)
    resumed = json.loads(result.stdout)
    assert resumed["samples"] == 72 and resumed["failures"] == 0
    before, after = read_samples(str(whole)), read_samples(str(out))
    assert before.keys() == after.keys() and len(after) == 72
    assert all(before[k] == after[k] for k in before)  # every member byte-identical


def _meta_layout(tmp_path: Path, sample_data_dir: Path) -> tuple[Path, dict, dict]:
    """A --train_data_meta_dir: one task with per-rank sub-folders, one text-to-image task without droptext."""
    meta = tmp_path / "meta"
    edit = original_output(meta / "edit_a", sample_data_dir, "edit_single", seed=1)
    ranks = meta / "edit_a" / "out_jsonl"
    for name in ("data_rank_000.jsonl", "data_rank_001.jsonl"):  # per-rank sub-folders inside the task
        (ranks / name[:-6]).mkdir()
        (ranks / name).rename(ranks / name[:-6] / name)
    t2i = original_output(meta / "t2i_b", sample_data_dir, "text_to_image", t2i=True, seed=2)
    return meta, edit, t2i


@pytest.mark.slow
def test_meta_folder_refuses_t2i_without_null_then_trains(sample_data_dir, tmp_path):
    meta, edit, t2i = _meta_layout(tmp_path, sample_data_dir)
    out = tmp_path / "shards"
    refused = run_module("shards_tools", "convert-legacy", str(meta), "--output_dir", str(out))
    assert refused.returncode == 2
    assert "t2i_b" in refused.stderr and "--null_embedding" in refused.stderr and "--model_path" in refused.stderr
    assert (out / "edit_a" / "manifest.json").exists() and not (out / "t2i_b" / "manifest.json").exists()

    null = torch.randn(5, HIDDEN).to(torch.bfloat16)
    torch.save(null.unsqueeze(0), tmp_path / "empty_prompt.pt")  # as shipped: [1, seq, hidden]
    args = ["--output_dir", str(out), "--null_embedding", str(tmp_path / "empty_prompt.pt"), "--json"]
    result = json.loads(run_module("shards_tools", "convert-legacy", str(meta), *args, check=True).stdout)
    assert result["layout"] == "meta" and set(result["tasks"]) == {"edit_a", "t2i_b"} and result["refused"] == {}
    assert result["tasks"]["t2i_b"]["samples"] == 12 and result["tasks"]["edit_a"]["samples"] == 12
    assert torch.equal(npy_to_embedding((out / "t2i_b" / "null_embedding.npy").read_bytes()), null)
    assert assert_every_tensor_kept(out / "t2i_b", t2i, ["data_rank_000.jsonl", "data_rank_001.jsonl"]) == 24
    assert assert_every_tensor_kept(out / "edit_a", edit, ["data_rank_000.jsonl", "data_rank_001.jsonl"]) == 72

    trace = tmp_path / "trace.jsonl"
    run_module(
        "pipeline.train",
        "--data_only",
        "--train_data_meta_dir",
        str(out),
        "--train_data_weights",
        "edit_a=1,t2i_b=1",
        "--train_src_img_num_weights",
        "0=1,1=1",
        "--max_train_steps",  # the default --text_drop_ratio, 0.05 as the original's
        "120",
        "--train_batch_size",
        "1",
        "--image_sample_size",
        "64",
        "--output_dir",
        str(tmp_path / "run"),
        "--data_trace",
        str(trace),
        check=True,
    )
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    variants = Counter((line["num_sources"], v) for line in lines for v in line["variants"])
    assert variants[(0, "null")] > 0 and variants[(1, "drop")] + variants[(1, "drop_inv")] > 0


def test_null_embedding_from_the_model(sample_data_dir, tiny_model_dir, tmp_path):
    from pipeline.kit.tiny_model import TINY_TEXT_HIDDEN

    assert TINY_TEXT_HIDDEN == HIDDEN
    work = tmp_path / "work"
    original_output(work, sample_data_dir, "text_to_image", t2i=True)
    out = tmp_path / "t2i"
    refused = convert_legacy(str(work / "out_jsonl"), str(out), None, ConvertOptions())
    assert refused["tasks"] == {} and "--null_embedding" in refused["refused"]["t2i"]
    options = ConvertOptions(model_path=str(tiny_model_dir))
    manifest = convert_legacy(str(work / "out_jsonl"), str(out), None, options)["tasks"]["t2i"]
    assert manifest["samples"] == 12 and manifest["null_embedding"] == "null_embedding.npy"
    assert manifest["model"]["config_sha256"]
    null = npy_to_embedding((out / "null_embedding.npy").read_bytes())
    assert null.shape[1] == HIDDEN and null.shape[0] > 0


def test_null_embedding_files_load_without_pickle(tmp_path):
    from pipeline.shards.format import embedding_to_npy
    from shards_tools.convert import load_embedding_file

    value = torch.randn(1, 6, HIDDEN).to(torch.bfloat16)
    torch.save(value, tmp_path / "null.pt")
    (tmp_path / "ours.npy").write_bytes(embedding_to_npy(value[0]))
    np.save(tmp_path / "ours3d.npy", value.view(torch.int16).numpy().view(np.uint16))
    np.save(tmp_path / "float.npy", value.float().numpy())
    for name in ("null.pt", "ours.npy", "ours3d.npy", "float.npy"):
        assert torch.equal(load_embedding_file(str(tmp_path / name), None).to(torch.bfloat16), value[0]), name
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_embedding_file(str(tmp_path / "objects.npy"), None)


@pytest.mark.slow
def test_converts_from_and_to_object_stores(sample_data_dir, tmp_path, object_store):
    """The original output uploaded to object storage: relative paths resolved there, shards written there."""
    work = tmp_path / "work"
    expected = original_output(work, sample_data_dir, "edit_single", ranks=1)
    fs = object_store.filesystem()
    fs.put(str(work), f"{object_store.bucket}/old/work", recursive=True)
    out = object_store.url("shards", "edit_a")
    legacy = object_store.url("old", "work", "out_jsonl")
    result = convert_legacy(legacy, out, None, ConvertOptions(max_samples_per_shard=5))
    manifest = result["tasks"]["edit_a"]
    assert result["layout"] == "task" and manifest["samples"] == 12 and manifest["failures"] == 0
    local = tmp_path / "back"
    fs.get(f"{object_store.bucket}/shards/edit_a", str(local), recursive=True)
    assert assert_every_tensor_kept(local, expected, ["data_rank_000.jsonl"]) == 12 * 6
    assert verify(out, None)[1] == []
