"""The run owns its folder, tried the way users break it: a rerun in the same folder, a second launch, a signal,
a changed setting on resume, a typo'd path — on the tiny model, through the real CLI (1 process and torchrun)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TRAIN_BASE, no_traceback_of_ours, run_module, train
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

LORA = ["--use_peft_lora", "--lora_r", "4", "--lora_alpha", "4", "--learning_rate", "1e-3"]


def one_line_error(result) -> str:
    """The CLI's refusal: exit 2, no traceback of ours; the logged error line."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert no_traceback_of_ours(result.stderr) and "Traceback" not in result.stderr, result.stderr[-3000:]
    return next(line for line in result.stderr.splitlines() if " ERROR " in line)


def args(model, meta, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_meta_dir", str(meta), "--output_dir", str(out),
        *TRAIN_BASE, *extra,
    ]  # fmt: skip


def test_a_fresh_start_over_an_old_run_is_refused_and_overwrite_moves_it_aside(tiny_model_dir, edit_meta, tmp_path):
    out = tmp_path / "run"
    common = [*LORA, "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    train(tiny_model_dir, edit_meta, out, *common, "--max_train_steps", "3")
    before = {p.name: (p / "checkpoint.json").read_bytes() for p in out.glob("checkpoint-*")}
    assert sorted(before) == ["checkpoint-2", "checkpoint-3"]

    line = one_line_error(
        run_module("pipeline.train", *args(tiny_model_dir, edit_meta, out, *common, "--max_train_steps", "2"))
    )
    assert "checkpoint-3" in line and "--resume_from_checkpoint latest" in line and "--overwrite_output_dir" in line
    assert {p.name: (p / "checkpoint.json").read_bytes() for p in out.glob("checkpoint-*")} == before

    train(tiny_model_dir, edit_meta, out, *common, "--max_train_steps", "2", "--overwrite_output_dir")
    (kept,) = out.glob("overwritten-*")
    assert {p.name: (p / "checkpoint.json").read_bytes() for p in kept.glob("checkpoint-*")} == before
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_resume_compares_every_setting_before_loading_and_knows_the_model_by_content(
    tiny_model_dir, edit_meta, tmp_path
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    link = tmp_path / "link"
    link.symlink_to(model)
    out = tmp_path / "run"
    train(link, edit_meta, out, *LORA, "--max_train_steps", "2", "--checkpointing_steps", "1")

    resume = ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    resumed = run_module("pipeline.train", *args(link, edit_meta, out, *LORA, "--lora_r", "8", *resume))
    line = one_line_error(resumed)
    assert "lora_r: 4 -> 8" in line and "size mismatch" not in resumed.stderr

    spelled = f"{model}{os.sep}"  # the same folder, spelled another way
    train(spelled, edit_meta, out, *LORA, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    weights = next((other / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")  # other weights: another size
    link.unlink()
    link.symlink_to(other)
    line = one_line_error(
        run_module(
            "pipeline.train",
            *args(link, edit_meta, out, *LORA, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"),
        )
    )
    assert "model_identity" in line


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= count:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {count} lines")


def launch(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_a_checkpoint_and_the_resume_ends_bit_equal(tiny_model_dir, edit_meta, tmp_path, nproc):
    """SIGTERM (a scheduler's stop) mid-run: every rank finishes its step, one checkpoint is saved together, the
    exit code says so; resuming from latest ends with the weights of a run that was never stopped."""
    steps = 24
    common = [*LORA, "--max_train_steps", str(steps), "--checkpointing_steps", "1000"]
    reference = tmp_path / "reference"
    train(tiny_model_dir, edit_meta, reference, *common, nproc=nproc)

    out = tmp_path / "stopped"
    trace = tmp_path / "trace.jsonl"
    runner = [sys.executable, "-m", "pipeline.train"]
    if nproc > 1:  # the signal goes to the launcher, which forwards it to its ranks (as SLURM or Kubernetes do)
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                  "-m", "pipeline.train"]  # fmt: skip
    process = launch([*runner, *args(tiny_model_dir, edit_meta, out, *common, "--data_trace", str(trace))])
    wait_for_lines(trace, 3 * nproc, process)
    process.send_signal(signal.SIGTERM)
    if nproc == 1:  # an impatient second signal while the run stops and saves changes nothing
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    if nproc == 1:
        assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM after step" in stderr and no_traceback_of_ours(stderr), stderr[-3000:]
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and 1 <= int(saved[0].name.split("-")[1]) < steps, saved

    train(tiny_model_dir, edit_meta, out, *common, "--resume_from_checkpoint", "latest", nproc=nproc)
    name = "pytorch_lora_weights.safetensors"
    expected, got = load_file(str(reference / name)), load_file(str(out / name))
    assert expected.keys() == got.keys()
    assert all((expected[k] == got[k]).all() for k in expected), "the stopped and resumed run differs bitwise"


def test_a_second_launch_on_a_live_runs_folder_is_refused(tiny_model_dir, edit_meta, tmp_path):
    out = tmp_path / "run"
    trace = tmp_path / "trace.jsonl"
    first = launch(
        [sys.executable, "-m", "pipeline.train",
         *args(tiny_model_dir, edit_meta, out, *LORA, "--max_train_steps", "100000", "--data_trace", str(trace))]
    )  # fmt: skip
    try:
        wait_for_lines(trace, 1, first)
        second = run_module(
            "pipeline.train", *args(tiny_model_dir, edit_meta, out, *LORA, "--max_train_steps", "2",
                                    "--resume_from_checkpoint", "latest"),
        )  # fmt: skip
        line = one_line_error(second)
        assert "another run" in line and f"pid {first.pid}" in line and str(out) in line
    finally:
        first.kill()
        first.communicate()


@pytest.mark.parametrize(
    "case",
    ["output_dir_is_a_file", "no_model_folder", "transformer_not_safetensors", "missing_lora_path", "extract_no_model"],
)
def test_user_mistakes_end_in_one_line_and_exit_2(tiny_model_dir, edit_meta, sample_data_dir, tmp_path, case):
    out = tmp_path / "out"
    model, extra = str(tiny_model_dir), ["--max_train_steps", "1"]
    if case == "output_dir_is_a_file":
        out.write_text("")
    elif case == "no_model_folder":
        model = "/nonexistent/model"
    elif case == "transformer_not_safetensors":
        bad = tmp_path / "weights.safetensors"
        bad.write_text("not safetensors")
        extra += ["--transformer_path", str(bad)]
    elif case == "missing_lora_path":
        extra += [*LORA, "--lora_path", str(tmp_path / "absent.safetensors")]
    if case == "extract_no_model":
        jsonl = next(Path(sample_data_dir).rglob("*.jsonl"))
        result = run_module("pipeline.extract", str(jsonl), "--output_dir", str(out), "--model_path", "/nonexistent")
        assert "/nonexistent" in one_line_error(result)
        return
    line = one_line_error(run_module("pipeline.train", *args(model, edit_meta, out, *extra)))
    assert {"output_dir_is_a_file": str(out), "no_model_folder": model, "missing_lora_path": "--lora_path",
            "transformer_not_safetensors": "weights.safetensors"}[case] in line  # fmt: skip


def test_a_bug_keeps_its_traceback_and_exit_1(tiny_model_dir, edit_meta, tmp_path):
    """A ValueError raised inside a library is not the user's mistake: it is reported as a bug."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import torch.nn.functional as F\n"
        "def broken(*a, **k):\n    raise ValueError('deep inside torch')\n"
        "F.scaled_dot_product_attention = broken\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}
    cmd = [
        sys.executable,
        "-m",
        "pipeline.train",
        *args(tiny_model_dir, edit_meta, tmp_path / "out", "--max_train_steps", "1"),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" in result.stderr and "deep inside torch" in result.stderr


def test_a_loader_worker_ignores_ctrl_c_and_outlives_a_sigterm_by_a_bounded_time():
    """The main process saves on SIGINT/SIGTERM with its workers alive; a worker nobody shuts down still ends."""
    code = (
        "import os, signal, time\n"
        "from pipeline.common.workers import WORKER_STOP_GRACE_S, stream_worker_init\n"
        "stream_worker_init(0)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.2)\n"
        "print(signal.alarm(0), WORKER_STOP_GRACE_S)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    left, grace = map(int, result.stdout.split())
    assert 0 < left <= grace  # the SIGTERM armed the alarm at the grace period; it has not run out yet


def test_a_run_that_diverged_by_its_last_step_exits_1_and_exports_nothing(tiny_model_dir, edit_meta, tmp_path):
    """--learning_rate 1e6: step 1's update blows the adapter up (finite, ~1e6), steps 2-4 are skipped as
    non-finite. It used to exit 0, export a LoRA that renders NaN and write ``"final_loss": [NaN]``."""
    out = tmp_path / "run"
    extra = ["--use_peft_lora", "--lora_r", "4", "--learning_rate", "1e6", "--max_train_steps", "4",
             "--checkpointing_steps", "2"]  # fmt: skip
    result = run_module("pipeline.train", *args(tiny_model_dir, edit_meta, out, *extra))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = next(line for line in result.stderr.splitlines() if " ERROR " in line)
    assert "last step (4) had a non-finite loss" in line and "neither saved nor exported" in line
    assert not list(out.glob("*.safetensors")) and not (out / "run_summary.json").exists()
    assert not (out / "checkpoint-4").exists()


def test_the_run_summary_is_valid_json_whatever_it_measured():
    import json
    import math

    from pipeline.train.cli import json_safe

    summary = {"final_loss": [math.nan], "peak": math.inf, "steps": [1.5, -math.inf], "ok": 3}
    assert json.loads(json.dumps(json_safe(summary), allow_nan=False)) == {
        "final_loss": [None], "peak": None, "steps": [1.5, None], "ok": 3
    }  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_model_loads_ends_in_one_line_and_releases_the_folder(
    tiny_model_dir, edit_meta, tmp_path, signum
):
    """It used to end with status -15 (SIGTERM: the lease left behind) or a KeyboardInterrupt traceback (SIGINT).
    A hook marks the moment the weights are first opened and holds the load there, so the signal lands in it."""
    hook, loading = tmp_path / "hook", tmp_path / "loading"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import pathlib, time, safetensors\n"
        "real = safetensors.safe_open\n"
        "def slow(*a, **k):\n"
        f"    marker = pathlib.Path({str(loading)!r})\n"
        "    if not marker.exists():\n"
        "        marker.touch()\n"
        "        time.sleep(60)\n"
        "    return real(*a, **k)\n"
        "safetensors.safe_open = slow\n"
    )
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.train", *args(tiny_model_dir, edit_meta, out, "--max_train_steps", "2")]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not loading.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and f"stopped by {signal.Signals(signum).name} outside the training" in stderr
    assert not (out / ".lease.json").exists(), "the run folder's lease is released"
    assert not list(out.glob("checkpoint-*"))
