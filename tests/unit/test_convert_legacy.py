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
from pathlib import Path

import numpy as np
import pytest
import torch
from legacy_outputs import HIDDEN, assert_every_tensor_kept, original_output

from pipeline.errors import UserError
from pipeline.shards.format import npy_to_embedding
from shards_tools.convert import ConvertOptions, convert_legacy
from shards_tools.verify import verify


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
    with pytest.raises(UserError, match=r"other input or flags \(inputs: "):
        convert_legacy(str(work / "out_jsonl"), str(out), None, ConvertOptions(max_samples_per_shard=5))


def test_a_rerun_with_another_train_copy_size_is_refused(sample_data_dir, tmp_path):
    work = tmp_path / "work"
    original_output(work, sample_data_dir, "edit_single", ranks=1)
    out = tmp_path / "edit_c"
    convert_legacy(str(work / "out_jsonl"), str(out), None, ConvertOptions(train_copy_size=64))
    with pytest.raises(UserError, match="train_copy_size: 64 then, 32 now"):
        convert_legacy(str(work / "out_jsonl"), str(out), None, ConvertOptions(train_copy_size=32))
    with pytest.raises(UserError, match="train_copy_size: 64 then, None now"):
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


def test_null_embedding_from_the_model(sample_data_dir, tiny_model_dir, tmp_path):
    from pipeline.families.qwen_edit.tiny import TINY_TEXT_HIDDEN

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
