"""Two nodes: two torchrun launchers on this machine (``--nnodes 2 --node_rank 0/1``, one process each, rendezvous on
127.0.0.1) are two nodes to every line of our code: LOCAL_RANK is 0 on both, RANK 0 and 1, GROUP_RANK the node."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FSDP_REFERENCE
from helpers import combined_jsonl, read_manifest, read_samples, transformer_weights, two_nodes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mixed_jsonl(sample_data_dir, tmp_path_factory):
    return combined_jsonl(sample_data_dir, tmp_path_factory.mktemp("two_nodes") / "mixed.jsonl")


def extract_args(jsonl, out, model_dir):
    return [str(jsonl), "--output_dir", str(out), "--model_path", str(model_dir), "--num_workers", "1",
            "--max_samples_per_shard", "4", "--batching", "exact"]  # fmt: skip


def test_extraction_over_two_nodes_writes_per_global_rank_one_manifest_and_resumes(
    mixed_jsonl, tiny_model_dir, tmp_path
):
    out = tmp_path / "task"
    first = two_nodes("pipeline.extract", *extract_args(mixed_jsonl, out, tiny_model_dir))
    assert [r.returncode for r in first] == [0, 0], first[1].stderr[-3000:]
    manifest = read_manifest(str(out))
    ranks = {s["url"].split("/")[1].split("-")[0] for s in manifest["shards"]}
    assert ranks == {"00000", "00001"}, "each global rank wrote its own shards (LOCAL_RANK is 0 on both nodes)"
    assert manifest["samples"] == 36 and manifest["world_size"] == 2
    assert len(read_samples(str(out))) == 36
    again = two_nodes("pipeline.extract", *extract_args(mixed_jsonl, out, tiny_model_dir))
    assert [r.returncode for r in again] == [0, 0]
    assert all("0 line(s) to process on this rank" in r.stderr for r in again), "the rerun resumed: nothing left"
    assert read_manifest(str(out))["samples"] == 36


def test_extraction_into_a_folder_each_node_names_differently_is_refused_naming_the_node(
    mixed_jsonl, tiny_model_dir, tmp_path
):
    cwds = (tmp_path / "node0", tmp_path / "node1")
    for cwd in cwds:
        cwd.mkdir()
    results = two_nodes("pipeline.extract", *extract_args(mixed_jsonl, "task", tiny_model_dir), cwds=cwds)
    assert all(r.returncode != 0 for r in results)
    said = results[0].stderr + results[1].stderr
    assert "rank 1 on host" in said and "(node 1) does not see" in said and "every node writes to" in said, said[-3000:]
    assert not (cwds[0] / "task" / "manifest.json").exists(), "no manifest that silently lacks node 1's shards"


FSDP_RUN = FSDP_REFERENCE


def test_fsdp_over_two_nodes_checkpoints_resumes_and_exports_what_one_node_trains(
    tiny_model_dir, edit_meta, fsdp_reference, tmp_path
):
    """Against the session's ``fsdp_reference``: the same run on one node of 2 processes (it also renders validation
    images, which must not change what is trained)."""
    one_node = fsdp_reference
    args = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_meta_dir", str(edit_meta),
            "--train_batch_size", "1", "--image_sample_size", "64", "--dataloader_num_workers", "1", "--seed", "3",
            "--report_to", "none", *FSDP_RUN]  # fmt: skip
    straight = tmp_path / "two_nodes"
    results = two_nodes("pipeline.train", *args, "--output_dir", str(straight))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:] + results[1].stderr[-3000:]
    resumed = tmp_path / "two_nodes_resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    results = two_nodes("pipeline.train", *args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest")
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:] + results[1].stderr[-3000:]
    reference = transformer_weights(one_node / "transformer")
    for folder in (straight, resumed):
        got = transformer_weights(folder / "transformer")
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in reference), f"{folder.name} differs from one node"
    marker = json.loads((straight / "checkpoint-3" / "checkpoint.json").read_text())
    assert {"fsdp/rank0.safetensors", "fsdp/rank1.safetensors"} <= set(marker["files"]), "a shard per global rank"


def test_a_checkpoint_folder_the_nodes_do_not_share_is_refused_at_start_naming_the_node(
    tiny_model_dir, edit_meta, tmp_path
):
    """Each node started in its own working folder with a relative --output_dir: it used to train for hours and fail
    at the first resume; now every rank stops at start-up with one line naming the node that cannot see the folder."""
    cwds = (tmp_path / "node0", tmp_path / "node1")
    for cwd in cwds:
        cwd.mkdir()
    args = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_meta_dir", str(edit_meta),
            "--train_batch_size", "1", "--image_sample_size", "64", "--report_to", "none", *FSDP_RUN]  # fmt: skip
    results = two_nodes("pipeline.train", *args, "--output_dir", "run", cwds=cwds, timeout=300)
    assert [r.returncode for r in results] == [2, 2] or all(r.returncode != 0 for r in results)
    said = results[0].stderr + results[1].stderr
    assert "rank 1 on host" in said and "(node 1) does not see" in said and "every node shares" in said, said[-3000:]
    assert not list((cwds[0] / "run").glob("checkpoint-*")), "refused before any step"
