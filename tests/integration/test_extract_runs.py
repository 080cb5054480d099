"""Extraction as users run it: torchrun with 2 processes, S3 endpoint routes, kill and resume.

Extraction into a bucket (S3 and GCS), killed and resumed, is in ``test_object_stores.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, alive, child_pids, combined_jsonl, extract, read_manifest, read_samples, torchrun

# integration: subprocess runs of the real CLIs on the tiny model (servers, torchrun, SIGKILL)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mixed_jsonl(sample_data_dir, tmp_path_factory):
    return combined_jsonl(sample_data_dir, tmp_path_factory.mktemp("runs") / "mixed.jsonl")


def test_two_processes_equal_one_sample_for_sample(mixed_jsonl, tiny_model_dir, tmp_path):
    single = tmp_path / "single" / "task"
    # exact batching: bit-equality across world sizes needs batch contents that do not depend on the split
    extract(mixed_jsonl, single, tiny_model_dir, "--max_samples_per_shard", "4", "--batching", "exact")
    double = tmp_path / "double" / "task"
    torchrun(
        2,
        "pipeline.extract",
        str(mixed_jsonl),
        "--output_dir",
        str(double),
        "--model_path",
        str(tiny_model_dir),
        "--num_workers",
        "1",
        "--max_samples_per_shard",
        "4",
        "--batching",
        "exact",
    )
    a, b = read_samples(str(single)), read_samples(str(double))
    assert sorted(a) == sorted(b) and len(a) == 36
    for key in a:
        assert a[key].keys() == b[key].keys()
        for member in a[key]:
            if member.startswith("emb_") or member.startswith(("target", "source")):
                assert a[key][member] == b[key][member], (key, member)
        meta_a, meta_b = json.loads(a[key]["json"]), json.loads(b[key]["json"])
        assert meta_a == meta_b
    manifest = read_manifest(str(double))
    ranks = {s["url"].split("/")[1].split("-")[0] for s in manifest["shards"]}
    assert ranks == {"00000", "00001"}, "each rank wrote its own shards; one manifest covers both"
    assert manifest["samples"] == 36 and manifest["world_size"] == 2
    # each rank took a disjoint share of the lines
    lines_by_rank = {}
    for commit_dir in sorted((double / "_progress").glob("rank-*")):
        lines_by_rank[commit_dir.name] = {
            n for f in commit_dir.glob("*.json") for n in json.loads(f.read_text())["lines"]
        }
    assert lines_by_rank["rank-00000"].isdisjoint(lines_by_rank["rank-00001"])


def test_s3_endpoint_from_fsspec_config_or_storage_options(sample_data_dir, tiny_model_dir, s3_env, tmp_path):
    jsonl = sample_data_dir / "text_to_image" / "data.jsonl"
    env = {k: v for k, v in s3_env.items() if k != "AWS_ENDPOINT_URL"}
    blocked = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # a wrong endpoint the other settings override

    url = f"s3://{s3_env['BUCKET']}/fsspec_env/t2i"
    result = extract(jsonl, url, tiny_model_dir, env={**env, "FSSPEC_S3_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL"]})
    assert result.returncode == 0
    url2 = f"s3://{s3_env['BUCKET']}/options/t2i"
    options = json.dumps({"s3": {"endpoint_url": s3_env["AWS_ENDPOINT_URL"], "key": "testing", "secret": "testing"}})
    result = extract(jsonl, url2, tiny_model_dir, "--storage_options", options, env=blocked)
    assert result.returncode == 0
    for u in (url, url2):
        assert read_manifest(u)["samples"] == 12


def _tar_state(root):
    return {p.relative_to(root): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*.tar")}


def test_sigkill_at_any_moment_then_rerun_loses_and_repeats_nothing(mixed_jsonl, tiny_model_dir, tmp_path):
    out = tmp_path / "killed" / "task"
    args = [
        str(mixed_jsonl),
        "--output_dir",
        str(out),
        "--model_path",
        str(tiny_model_dir),
        "--num_workers",
        "1",
        "--batch_size",
        "1",
        "--max_samples_per_shard",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    survivors, seen_workers = {}, set()
    for kill_after_commits in (2, 7, 12):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.extract", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            commits = list((out / "_progress").glob("rank-*/*.json"))
            if len(commits) >= kill_after_commits:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        workers = child_pids(proc.pid)  # empty when its worker already read every pending line
        seen_workers |= workers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while alive(workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not alive(workers), "DataLoader workers of the killed run are still alive"
        assert not (out / "manifest.json").exists()
        committed = {
            json.loads(p.read_text())["shard"]["url"]
            for p in (out / "_progress").glob("rank-*/*.json")
            if json.loads(p.read_text())["shard"]
        }
        survivors.update({k: v for k, v in _tar_state(out).items() if str(k) in committed})

    assert seen_workers, "at least one killed run had its DataLoader worker"
    result = extract(*args[:1], out, tiny_model_dir, *args[5:], check=True)
    assert "line(s) of the task done before" in result.stderr
    after = _tar_state(out)
    for shard, state in survivors.items():
        assert after[shard] == state, f"{shard} was rewritten; completed shards must not be redone"

    manifest = read_manifest(str(out))
    samples = read_samples(str(out))  # raises on a duplicate key
    lines = sorted(json.loads(s["json"])["line"] for s in samples.values())
    failures = out / "_failures" / "rank-0.jsonl"
    failed = [json.loads(x)["line"] for x in failures.read_text().splitlines()] if failures.exists() else []
    assert sorted(lines + failed) == list(range(36)), "every input line exactly once, in a shard or in _failures"
    assert manifest["samples"] == len(lines) == 36
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*.tar")}
    assert on_disk == {s["url"] for s in manifest["shards"]}, "no orphan shards remain"
    assert not list(out.rglob("*.tmp-*"))
