"""Training data stream: mixing, batches, never starving, exact resume, safety, sources."""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import PickleBomb, extract, run_module, torchrun

from pipeline.shards.tasks import discover_tasks, task_from_patterns
from pipeline.train.config.data import StreamConfig
from pipeline.train.stream.dataset import MixedBatchDataset
from pipeline.train.stream.mix import plan_mix

TASKS = ("edit_single", "compose_multi", "text_to_image")


def train_data(*args: str, env=None, nproc: int = 1):
    """Run ``pipeline.train --data_only`` (under torchrun when nproc > 1)."""
    if nproc == 1:
        return run_module("pipeline.train", "--data_only", *args, env=env, check=True)
    return torchrun(nproc, "pipeline.train", "--data_only", *args, env=env, timeout=600)


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- weights and mixing ----------------------------------------------------------------------


# --- batches -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_batches_follow_the_design(meta_dir):
    tasks = discover_tasks(str(meta_dir), None)
    plan = plan_mix(tasks, {t: 1.0 for t in tasks}, {"0": 1, "1": 1, "2": 1, "3": 1})
    config = StreamConfig(
        batch_size=2, seed=3, shuffle_buffer=4, image_sample_size=96, enable_inverse=True, text_drop_ratio=0.3
    )
    dataset = MixedBatchDataset(tasks, plan, 0, 1, config)
    metas = {}
    for task in TASKS:
        for tar in (meta_dir / task).rglob("*.tar"):
            with tarfile.open(tar) as tf:
                for m in tf:
                    if m.name.endswith(".json"):
                        meta = json.loads(tf.extractfile(m).read())
                        metas[(task, meta["key"])] = meta
    seen_null = seen_inverse = 0
    for _, batch in zip(range(40), iter(dataset), strict=False):
        n, b = batch["num_sources"], len(batch["keys"])
        buckets = {tuple(metas[(batch["task"], k)]["bucket"]) for k in batch["keys"]}
        assert buckets == {tuple(batch["bucket"])}, "one aspect bucket per batch"
        assert {metas[(batch["task"], k)]["num_sources"] for k in batch["keys"]} == {n}
        _, _, h, w = batch["target"].shape
        assert h % 32 == 0 and w % 32 == 0 and abs(h * w - 96 * 96) <= 96 * 96 * 0.6
        assert batch["target"].dtype == torch.uint8, "pixels travel as uint8; the loss scales them on the device"
        assert len(batch["sources"]) == n and all(s.shape[0] == b and s.shape[2] % 32 == 0 for s in batch["sources"])
        emb, mask = batch["prompt_embeds"], batch["prompt_mask"]
        assert emb.dtype == torch.bfloat16 and emb.shape[:2] == mask.shape and emb.shape[2] == 64
        for row in range(b):
            length = int(mask[row].sum())
            assert mask[row, :length].all() and not mask[row, length:].any()
            assert not emb[row, length:].any()
            variant = batch["variants"][row]
            meta = metas[(batch["task"], batch["keys"][row])]
            if variant == "null":
                seen_null += 1
                assert n == 0
            else:
                assert variant in meta["variants"] and length == meta["variants"][variant][0]
            seen_inverse += variant.endswith("_inv")
            if variant.startswith(("drop", "null")):
                assert batch["texts"][row] == ""
    assert seen_null and seen_inverse


@pytest.mark.slow
def test_only_the_chosen_embedding_is_fetched(meta_dir, monkeypatch):
    from pipeline.shards.reader import RangeReader

    tasks = discover_tasks(str(meta_dir), None)
    plan = plan_mix(tasks, {"edit_single": 1.0}, {"1": 1})
    dataset = MixedBatchDataset(tasks, plan, 0, 1, StreamConfig(batch_size=1, shuffle_buffer=0, image_sample_size=64))
    iterator = iter(dataset)
    reads = []
    original = RangeReader.read

    def spy(self, url, start=None, end=None):
        reads.append((url, start, end))
        return original(self, url, start, end)

    monkeypatch.setattr(RangeReader, "read", spy)
    batch = next(iterator)
    key, variant = batch["keys"][0], batch["variants"][0]
    for shard in tasks["edit_single"].shards[1]:
        for entry in json.loads(Path(shard.index_url).read_text())["samples"]:
            if entry["key"] == key:
                found, shard_url = entry, shard.url
    ranges = {ext[4:-4]: (o, o + n) for ext, (o, n) in found["members"].items() if ext.startswith("emb_")}
    fetched = [
        v
        for v, (a, b) in ranges.items()
        if any(u == shard_url and s is not None and s < b and e > a for u, s, e in reads)
    ]
    assert len(ranges) >= 2 and fetched == [variant]


# --- running the real loader -------------------------------------------------------------------


@pytest.mark.slow
def test_one_shard_two_ranks_three_workers_never_starve(sample_data_dir, tiny_model_dir, tmp_path):
    task_dir = tmp_path / "tiny_task"
    extract(
        sample_data_dir / "compose_multi" / "data.jsonl", task_dir, tiny_model_dir, "--max_samples_per_shard", "100"
    )
    assert len(list((task_dir / "src2").glob("*.tar"))) == 1
    trace = tmp_path / "trace.jsonl"
    train_data(
        "--train_shards",
        f"one={task_dir}/src2/00000-000000.tar",
        "--train_src_img_num_weights",
        "2=1",
        "--train_batch_size",
        "1",
        "--dataloader_num_workers",
        "3",
        "--max_train_steps",
        "24",
        "--checkpointing_steps",
        "100",
        "--output_dir",
        str(tmp_path / "run"),
        "--data_trace",
        str(trace),
        "--image_sample_size",
        "64",
        nproc=2,
    )
    lines = read_trace(trace)
    per_rank = Counter(line["rank"] for line in lines)
    assert per_rank == {0: 24, 1: 24}
    keys_by_rank = {r: {k for line in lines if line["rank"] == r for k in line["keys"]} for r in (0, 1)}
    assert keys_by_rank[0] and keys_by_rank[1]


def _run_args(meta_dir, out, trace, steps, workers=2):
    return [
        "--train_data_meta_dir",
        str(meta_dir),
        "--train_data_weights",
        "edit_single=1,compose_multi=1.5,text_to_image=0.7",
        "--train_src_img_num_weights",
        "0=1,1=2,2=1,3=1",
        "--train_batch_size",
        "2",
        "--enable_inverse",
        "--text_drop_ratio",
        "0.2",
        "--shuffle_buffer",
        "4",
        "--dataloader_num_workers",
        str(workers),
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        "6",
        "--output_dir",
        str(out),
        "--data_trace",
        str(trace),
        "--image_sample_size",
        "64",
        "--seed",
        "11",
    ]


@pytest.mark.slow
def test_exact_resume_two_ranks_two_workers(meta_dir, tmp_path):
    straight_trace = tmp_path / "straight.jsonl"
    train_data(*_run_args(meta_dir, tmp_path / "straight", straight_trace, 18), nproc=2)
    resumed_trace = tmp_path / "resumed.jsonl"
    train_data(*_run_args(meta_dir, tmp_path / "resumed", resumed_trace, 6), nproc=2)
    assert (tmp_path / "resumed" / "checkpoint-6" / "checkpoint.json").exists()
    resumed_trace.write_text("")
    train_data(
        *_run_args(meta_dir, tmp_path / "resumed", resumed_trace, 18), "--resume_from_checkpoint", "latest", nproc=2
    )

    def by_step(lines):
        return sorted((line["step"], line["rank"], json.dumps(line, sort_keys=True)) for line in lines)

    straight = [x for x in by_step(read_trace(straight_trace)) if x[0] > 6]
    resumed = by_step(read_trace(resumed_trace))
    assert [x[:2] for x in resumed] == [x[:2] for x in straight]
    assert resumed == straight
    # N equal across ranks at every step, tasks drawn per rank
    lines = read_trace(straight_trace)
    n_by_step: dict[int, set] = {}
    for line in lines:
        n_by_step.setdefault(line["step"], set()).add(line["num_sources"])
    assert len(n_by_step) == 18 and all(len(v) == 1 for v in n_by_step.values())
    assert len({line["num_sources"] for line in lines}) >= 3


@pytest.mark.slow
def test_resume_is_a_seek_not_a_replay(meta_dir):
    tasks = discover_tasks(str(meta_dir), None)
    plan = plan_mix(tasks, {t: 1.0 for t in tasks}, {"0": 1, "1": 1, "2": 1, "3": 1})
    config = StreamConfig(batch_size=1, seed=5, shuffle_buffer=2, image_sample_size=64)
    first = MixedBatchDataset(tasks, plan, 0, 1, config)
    iterator = iter(first)
    for _ in range(150):
        next(iterator)
    state = json.loads(json.dumps(first.state_dict()))
    consumed = first.reader.bytes_read
    expected = next(iterator)
    second = MixedBatchDataset(tasks, plan, 0, 1, config)
    second.load_state_dict(state)
    got = next(iter(second))
    assert got["keys"] == expected["keys"] and got["variants"] == expected["variants"]
    assert torch.equal(got["target"], expected["target"])
    # re-reading the buffers and one batch costs a small fraction of what 150 steps read
    assert second.reader.bytes_read < consumed / 5


# --- safety and sources ------------------------------------------------------------------------


def _copy_shard_with_extra_members(src: Path, dst: Path, extra: dict[str, bytes]) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        first_key = None
        for member in tin:
            data = tin.extractfile(member).read()
            first_key = first_key or member.name.split(".", 1)[0]
            tout.addfile(member, io.BytesIO(data))
        for ext, data in extra.items():
            info = tarfile.TarInfo(f"{first_key}.{ext}")
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_pickle_members_are_never_executed_and_broken_shards_are_skipped(meta_dir, tmp_path, caplog):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(PickleBomb(marker))
    src = next((meta_dir / "compose_multi" / "src2").glob("*.tar"))
    evil = tmp_path / "evil" / "src2" / "00000-000000.tar"
    evil.parent.mkdir(parents=True)
    _copy_shard_with_extra_members(src, evil, {"pyd": payload, "pickle": payload, "pth": payload})
    broken = tmp_path / "evil" / "src2" / "00000-000001.tar"
    # the second src2 shard (shard numbers count all of a rank's shards, so they depend on completion order)
    good = sorted((meta_dir / "compose_multi" / "src2").glob("*.tar"))[1]
    second = json.loads(good.with_name(good.name.replace(".tar", ".index.json")).read_text())["samples"][1]
    offset, size = second["members"]["emb_en.npy"]
    broken.write_bytes(good.read_bytes()[: offset + size // 2])  # truncated inside the second sample
    task = task_from_patterns("evil", [str(tmp_path / "evil" / "src2" / "00000-00000{0,1}.tar")], None)
    assert all(s.index_url is None for s in task.shards[2]), "no index: webdataset streams these shards"
    plan = plan_mix({"evil": task}, {"evil": 1}, {"2": 1})
    dataset = MixedBatchDataset(
        {"evil": task}, plan, 0, 1, StreamConfig(batch_size=1, shuffle_buffer=0, image_sample_size=64)
    )
    with caplog.at_level(logging.WARNING):
        batches = [b for _, b in zip(range(12), iter(dataset), strict=False)]
    assert not marker.exists(), "a pickle member was unpickled"
    assert len(batches) == 12 and all(b["target"].shape[0] == 1 for b in batches)
    assert "skipped" in caplog.text and "truncated" in caplog.text, "the truncated sample is reported"
    assert sum(s.skipped for s in dataset._streams.values()) >= 1, "and counted"


@pytest.mark.slow
def test_pipe_and_brace_urls_give_the_same_batches_as_indexed_reads(meta_dir):
    """Both read every sample once per epoch; indexed shards in a computed sample-level order, streamed ones (no
    index) in file order through their shuffle buffer."""
    shards = sorted((meta_dir / "edit_single" / "src1").glob("*.tar"))
    last = f"{len(shards) - 1:06d}"
    pattern = str(shards[0].parent) + "/00000-{000000.." + last + "}.tar"
    indexed = task_from_patterns("t", [pattern], None)
    piped = task_from_patterns("t", [f"pipe:cat {s}" for s in shards], None)
    assert all(s.index_url for s in indexed.shards[1]) and not any(s.index_url for s in piped.shards[1])
    total = sum(s.samples for s in indexed.shards[1])
    config = StreamConfig(batch_size=1, seed=9, shuffle_buffer=0, image_sample_size=64)
    epochs = []
    for task in (indexed, piped):
        plan = plan_mix({"t": task}, {"t": 1}, {"1": 1})
        ds = MixedBatchDataset({"t": task}, plan, 0, 1, config)
        epochs.append([b["keys"][0] for _, b in zip(range(total), iter(ds), strict=False)])
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == total, "each sample once per epoch"
    in_file_order = sorted(epochs[1], key=lambda k: k)
    assert epochs[0] != in_file_order, "indexed shards are not read in file order"


@pytest.mark.slow
def test_reads_from_s3_through_a_flaky_proxy(meta_dir, s3_env, tmp_path):
    import fsspec
    from flaky_proxy import FlakyProxy

    bucket = s3_env["BUCKET"]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(meta_dir / "edit_single"), f"{bucket}/meta/edit_single", recursive=True)
    with FlakyProxy(s3_env["AWS_ENDPOINT_URL"], fail_every=3) as proxy:
        env = {**s3_env, "AWS_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "1"}
        trace = tmp_path / "s3.jsonl"
        result = train_data(
            "--train_data_meta_dir",
            f"s3://{bucket}/meta",
            "--train_src_img_num_weights",
            "1=1",
            "--train_batch_size",
            "1",
            "--dataloader_num_workers",
            "1",
            "--max_train_steps",
            "8",
            "--checkpointing_steps",
            "100",
            "--output_dir",
            str(tmp_path / "run"),
            "--data_trace",
            str(trace),
            "--image_sample_size",
            "64",
            env=env,
        )
        assert proxy.failures > 0, "the proxy injected errors"
    assert "transient error reading" in result.stderr
    assert len(read_trace(trace)) == 8


@pytest.mark.slow
def test_http_shards_are_read_by_range_like_local_ones(meta_dir):
    from range_server import RangeServer

    shards = sorted((meta_dir / "edit_single" / "src1").glob("*.tar"))
    last = f"{len(shards) - 1:06d}"
    local = task_from_patterns("t", [str(shards[0].parent) + "/00000-{000000.." + last + "}.tar"], None)
    config = StreamConfig(batch_size=1, seed=4, shuffle_buffer=2, image_sample_size=64)
    with RangeServer(meta_dir) as server:
        remote = task_from_patterns("t", [server.url + "/edit_single/src1/00000-{000000.." + last + "}.tar"], None)
        assert all(s.index_url and s.samples for s in remote.shards[1]), "the .index.json beside each shard is found"
        out = []
        for task in (local, remote):
            ds = MixedBatchDataset({"t": task}, plan_mix({"t": task}, {"t": 1}, {"1": 1}), 0, 1, config)
            out.append([(b["keys"], b["variants"]) for _, b in zip(range(12), iter(ds), strict=False)])
        ranged = [r for p, r in server.requests if p.endswith(".tar") and r]
    assert out[0] == out[1]
    assert ranged and all(r.startswith("bytes=") for r in ranged), "tar data came by byte ranges"


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train_data_weights", "edit_single=1,nope=2"], "available tasks: ['compose_multi', 'edit_single'"),
        (["--train_data_weights", "edit_single=x"], "not a number"),
        (["--train_src_img_num_weights", "0=1"], "nothing to train on"),
    ],
)
def test_cli_reports_bad_data_flags(meta_dir, tmp_path, flags, message):
    args = [
        "--data_only",
        "--train_data_meta_dir",
        str(meta_dir),
        "--max_train_steps",
        "1",
        "--output_dir",
        str(tmp_path),
        "--train_data_weights",
        "edit_single=1",
        *flags,
    ]
    result = run_module("pipeline.train", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


# --- what the tasks' embeddings were made with (issue 13, item 5) ---------------------------------


@pytest.mark.slow
def test_a_corrupt_image_in_an_indexed_shard_costs_a_sample_not_the_run(meta_dir, tmp_path, caplog):
    import shutil

    task_dir = tmp_path / "edit_single"
    shutil.copytree(meta_dir / "edit_single", task_dir)
    shard = sorted((task_dir / "src1").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tf:  # garbage of the same length: the index stays valid, the image does not
        member = next(m for m in tf.getmembers() if ".target." in m.name)
    data[member.offset_data : member.offset_data + member.size] = b"\x00garbage" * (member.size // 8) + b"\x00" * (
        member.size % 8
    )
    shard.write_bytes(bytes(data))
    tasks = discover_tasks(str(tmp_path), None)
    plan = plan_mix(tasks, {"edit_single": 1.0}, {"1": 1})
    config = StreamConfig(batch_size=2, seed=3, shuffle_buffer=0, image_sample_size=64, text_drop_ratio=0.0)
    dataset = MixedBatchDataset(tasks, plan, 0, 1, config)
    with caplog.at_level(logging.WARNING):
        batches = [batch for _, batch in zip(range(12), iter(dataset), strict=False)]
    assert len(batches) == 12 and all(len(b["keys"]) == 2 for b in batches)
    assert "unusable" in caplog.text and "replaced" in caplog.text
    assert all(member.name.split(".", 1)[0] not in b["keys"] for b in batches)
