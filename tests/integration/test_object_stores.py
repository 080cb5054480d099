"""The object-store paths, the same assertions against S3 (moto server) and GCS (fake-gcs-server).

Extraction killed and resumed into a bucket, training read from a bucket by
byte ranges with exact resume; the shard tools' object-store tests live with the
tools (``test_shards_tools.py``, ``test_convert_legacy.py``).  And every way a
GCS user points the project at an endpoint opens a task without gcsfs's 60 s
gRPC bucket-type probe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest
from helpers import REPO, combined_jsonl, extract, read_manifest, read_samples, run_module

from pipeline.shards.reader import IndexCache, RangeReader, read_indexed_sample
from pipeline.shards.tasks import open_task

pytestmark = pytest.mark.slow


def use_gcsfs_default_client() -> None:
    """fsspec's own choice of GCS client, as a fresh process has it (the project may have re-routed it)."""
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, "gcsfs.GCSFileSystem", clobber=True)


def test_every_gcs_endpoint_route_opens_a_task_without_stalling(meta_dir, gcs_env, gcs_server, monkeypatch):
    """Environment, flat and per-protocol ``--storage_options``: each opens a task and range-reads a sample fast.

    Through gcsfs's default client, an ``endpoint_url`` with ``token="anon"`` made
    every call wait 60 s for a gRPC probe of the bucket's type.
    """
    from gcsfs.core import GCSFileSystem

    bucket = gcs_env["BUCKET"]
    GCSFileSystem(endpoint_url=gcs_server.url, token="anon", skip_instance_cache=True).put(
        str(meta_dir / "edit_single"), f"{bucket}/edit_single", recursive=True
    )
    routes = {
        "STORAGE_EMULATOR_HOST": None,
        "flat --storage_options": {"endpoint_url": gcs_server.url, "token": "anon"},
        "per-protocol --storage_options": {"gs": {"endpoint_url": gcs_server.url, "token": "anon"}},
    }
    for route, options in routes.items():
        use_gcsfs_default_client()
        if options is not None:
            monkeypatch.delenv("STORAGE_EMULATOR_HOST")
        started = time.monotonic()
        task = open_task(f"gs://{bucket}/edit_single", options)
        shard = task.shards[1][0]
        reader = RangeReader(options)
        entry = IndexCache(reader).get(shard.index_url)[0]
        sample = read_indexed_sample(reader, shard.url, entry)
        took = time.monotonic() - started
        assert task.manifest["samples"] == 12 and sample.meta["num_sources"] == 1, route
        assert took < 5, f"{route}: {took:.1f}s to open a task and read one sample"
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    use_gcsfs_default_client()


def _wait_for_commits(fs, prefix: str, proc: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            found = [p for p in fs.find(f"{prefix}/_progress", refresh=True) if "/rank-" in p and p.endswith(".json")]
        except FileNotFoundError:
            found = []
        if len(found) >= count:
            return
        time.sleep(0.05)


def test_extraction_killed_and_resumed_in_a_bucket(sample_data_dir, tiny_model_dir, object_store, tmp_path):
    """Credentials and endpoint from the environment; SIGKILL after two commits; the rerun completes exactly once."""
    both = combined_jsonl(sample_data_dir, tmp_path / "both.jsonl", ("edit_single", "text_to_image"))
    rows = both.read_text().splitlines()
    jsonl = tmp_path / "mixed.jsonl"  # 6 edits with one source, 6 text-to-image samples
    jsonl.write_text("\n".join(rows[:6] + rows[12:18]) + "\n")
    url = object_store.url("datasets", "edit")
    args = [str(jsonl), "--output_dir", url, "--model_path"]
    args += [str(tiny_model_dir), "--num_workers", "0", "--batch_size", "1", "--max_samples_per_shard", "2"]
    fs = object_store.filesystem()
    env = {**os.environ, **object_store.env, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.extract", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_commits(fs, f"{object_store.bucket}/datasets/edit", proc, 2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not fs.exists(f"{object_store.bucket}/datasets/edit/manifest.json")

    result = extract(*args[:1], url, tiny_model_dir, *args[5:], env=object_store.env)
    assert "line(s) of the task done before" in result.stderr
    manifest = read_manifest(url)
    samples = read_samples(url)  # raises on a duplicate key
    assert manifest["samples"] == len(samples) == 12
    assert sorted(json.loads(s["json"])["line"] for s in samples.values()) == list(range(12))
    listed = fs.find(f"{object_store.bucket}/datasets/edit", refresh=True)
    assert not [p for p in listed if ".tmp-" in p], "no temporary objects are left behind"
    on_store = {p.split("/datasets/edit/", 1)[1] for p in listed if p.endswith(".tar")}
    assert on_store == {s["url"] for s in manifest["shards"]}, "no orphan shards remain"
    for shard in manifest["shards"]:
        assert fs.size(f"{object_store.bucket}/datasets/edit/{shard['url']}") == shard["bytes"]
    assert {s["num_sources"] for s in manifest["shards"]} == {0, 1}
    assert fs.exists(f"{object_store.bucket}/datasets/edit/null_embedding.npy")


def _train(url: str, out, trace, steps: int, env: dict, *extra: str):
    args = ["--train_data_meta_dir", url, "--train_src_img_num_weights", "0=1,1=1,2=1,3=1"]
    args += ["--train_batch_size", "2", "--dataloader_num_workers", "2", "--max_train_steps", str(steps)]
    args += ["--checkpointing_steps", "5", "--output_dir", str(out), "--data_trace", str(trace)]
    args += ["--image_sample_size", "64", "--shuffle_buffer", "4", *extra]
    return run_module("pipeline.train", "--data_only", *args, env=env, check=True)


def test_training_reads_a_bucket_by_ranges_and_resumes_exactly(meta_dir, object_store, tmp_path, monkeypatch):
    """Two DataLoader workers; on GCS configured the way that stalled (per-protocol options, no environment)."""
    fs = object_store.filesystem()
    for task in ("edit_single", "compose_multi", "text_to_image"):
        fs.put(str(meta_dir / task), f"{object_store.bucket}/meta/{task}", recursive=True)
    env, extra = dict(object_store.env), []
    if object_store.scheme == "gs":
        monkeypatch.delenv("STORAGE_EMULATOR_HOST")
        env = {k: v for k, v in env.items() if k != "STORAGE_EMULATOR_HOST"}
        options = {"gs": {"endpoint_url": object_store.endpoint, "token": "anon"}}
        extra = ["--storage_options", json.dumps(options)]
    url = object_store.url("meta")
    task = open_task(f"{url}/edit_single", json.loads(extra[1]) if extra else None)
    assert all(s.index_url for shards in task.shards.values() for s in shards), "shards are read by index"

    straight, resumed = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    _train(url, tmp_path / "a", straight, 10, env, *extra)
    checkpoint = str(tmp_path / "a" / "checkpoint-5")
    _train(url, tmp_path / "b", resumed, 10, env, *extra, "--resume_from_checkpoint", checkpoint)
    after = [json.loads(x) for x in straight.read_text().splitlines() if json.loads(x)["step"] > 5]
    again = [json.loads(x) for x in resumed.read_text().splitlines()]
    assert len(again) == 5 and again == after
