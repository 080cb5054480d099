"""Test helpers: run the CLIs, read what they wrote with webdataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import webdataset as wds
from webdataset.gopen import gopen_schemes

from pipeline.kit.sample_data import combined_jsonl  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 600, check: bool = False):
    """Run ``python -m module args`` in a fresh process (as a user would)."""
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} exited {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


def torchrun(nproc: int, module: str, *args: str, env: dict | None = None, timeout: int = 900):
    """``torchrun --standalone --nproc_per_node=N -m module args`` on CPU; fails the test on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, env=full_env, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"torchrun {module} exited {result.returncode}\n{result.stderr[-4000:]}")
    return result


def extract(jsonl, out_dir, model_dir, *extra: str, env: dict | None = None, check: bool = True):
    return run_module(
        "pipeline.extract",
        str(jsonl),
        "--output_dir",
        str(out_dir),
        "--model_path",
        str(model_dir),
        "--num_workers",
        "0",
        *extra,
        env=env,
        check=check,
    )


def read_manifest(task_url: str, **storage_options) -> dict:
    with fsspec.open(f"{task_url}/manifest.json", "rb", **storage_options) as handle:
        return json.loads(handle.read())


def read_samples(task_url: str, **storage_options) -> dict[str, dict[str, bytes]]:
    """Every sample of a task, read with webdataset from the manifest's shard URLs."""
    manifest = read_manifest(task_url, **storage_options)
    urls = [f"{task_url}/{s['url']}" for s in manifest["shards"]]
    if not urls:
        return {}
    # webdataset has no s3 opener of its own; give it fsspec's
    gopen_schemes.setdefault("s3", lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open())
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample.pop("__key__")
        sample.pop("__url__", None)
        sample.pop("__local_path__", None)
        assert key not in samples, f"duplicate key {key}"
        samples[key] = sample
    return samples
