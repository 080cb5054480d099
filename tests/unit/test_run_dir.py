"""The run's folder (``engine/run_dir.py``): one run writes it, a fresh start never buries or prunes another run's
checkpoints, ``--overwrite_output_dir`` moves the old run aside, the lease trusts a recent renewal over a pid."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from pipeline.common.collective import Collective
from pipeline.errors import UserError
from pipeline.shards.lease import LeaseHeld, RankLease
from pipeline.shards.storage import Store
from pipeline.train.engine.checkpoint import folders
from pipeline.train.engine.checkpoint import manager as checkpoint_manager
from pipeline.train.engine.run_dir import LEASE_FILE, RUN_FILE, RunDirectory

SPECIFIES = ("pipeline.shards.lease",)

ALONE = Collective(0, 1)


def save(out, step, run_id, limit=None, owns=lambda marker: True):
    def write(folder):
        (folder / "weights.txt").write_text(f"{run_id}:{step}")

    return checkpoint_manager.save_checkpoint(out, step, ALONE, write, {"run_id": run_id}, limit, owns)


def opened(out, resume=None, overwrite=False) -> RunDirectory:
    run = RunDirectory(out, ALONE)
    run.open(resume, overwrite)
    return run


def test_a_fresh_start_over_checkpoints_is_refused_naming_the_newest_and_both_ways_on(tmp_path):
    for step in (2, 8):
        save(tmp_path, step, "a")
    with pytest.raises(UserError) as refused:
        opened(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and "checkpoint-8" in message
    assert "--resume_from_checkpoint latest" in message and "--overwrite_output_dir" in message
    assert [p.name for _, p in folders.complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-8"]


def test_overwrite_moves_the_old_run_aside_and_never_deletes_it(tmp_path):
    save(tmp_path, 4, "a")
    (tmp_path / "config.yaml").write_text("learning_rate: 1\n")
    run = opened(tmp_path, overwrite=True)
    try:
        assert folders.complete_checkpoints(tmp_path) == []
        kept = list(tmp_path.glob("overwritten-*"))
        assert len(kept) == 1
        assert (kept[0] / "checkpoint-4" / "weights.txt").read_text() == "a:4"
        assert (kept[0] / "config.yaml").is_file() and (tmp_path / LEASE_FILE).is_file()
    finally:
        run.close()
    assert not (tmp_path / LEASE_FILE).exists(), "released on close"


RUN_WROTE = [
    "checkpoint-4", ".checkpoint-6.incomplete", "abandoned-20260101-000000-checkpoint-9",
    "damaged-20260101-000000-checkpoint-8", "config.yaml", "config-before-step-2-20260101-000000.yaml", "run.json",
    "run_summary.json", "first_batch.png", "validation", "logs", "transformer", "pytorch_lora_weights.safetensors",
    "qwen_image_edit_lora_comfyui.safetensors", "tb", "trace.jsonl",
]  # fmt: skip
USERS_OWN = [".git", ".env", "model", "shards", "recipe.yaml", "train.log", "checkpoints-notes.txt", "transformer.md"]


def test_overwrite_moves_only_what_a_run_writes_and_says_what_it_left(tmp_path, monkeypatch, caplog):
    from types import SimpleNamespace

    from pipeline.train.engine.run_dir import run_names

    monkeypatch.chdir(tmp_path)
    save(tmp_path, 4, "a")
    for name in RUN_WROTE[1:] + USERS_OWN:
        if "." in name.lstrip(".") and name != ".checkpoint-6.incomplete":
            (tmp_path / name).write_text(name)
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "inside").write_text(name)
    config = SimpleNamespace(
        output_dir=".", tracking=SimpleNamespace(logging_dir="tb/run"), data=SimpleNamespace(trace_path="trace.jsonl")
    )
    assert run_names(config) == ("tb", "trace.jsonl")
    with open(tmp_path / "train.log", "a") as log_being_written, caplog.at_level("WARNING"):
        run = RunDirectory(".", ALONE, run_names(config))
        run.open(None, overwrite=True)
        log_being_written.write("still writing\n")
    run.close()
    (kept,) = tmp_path.glob("overwritten-*")
    assert sorted(p.name for p in kept.iterdir()) == sorted(RUN_WROTE)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*USERS_OWN, kept.name])
    assert (tmp_path / "train.log").read_text() == "train.logstill writing\n"
    left = next(r.message for r in caplog.records if "left in place" in r.message)
    assert all(name in left for name in USERS_OWN)


def test_overwrite_with_resume_latest_is_refused(tmp_path):
    with pytest.raises(UserError, match="give one of them"):
        opened(tmp_path, resume="latest", overwrite=True)


def test_an_output_dir_that_is_a_file_is_a_user_error(tmp_path):
    target = tmp_path / "out"
    target.write_text("")
    with pytest.raises(UserError, match="is a file"):
        opened(target)


def test_pruning_removes_only_the_runs_own_checkpoints(tmp_path):
    """The audit's case: run A's newer checkpoints in the folder must not make run B prune what it just wrote."""
    for step in (6, 8):
        save(tmp_path, step, "a")
    run = RunDirectory(tmp_path, ALONE)
    run.adopt(None)
    for step in (1, 2, 3):
        save(tmp_path, step, run.run_id, limit=2, owns=run.owns)
    names = [p.name for _, p in folders.complete_checkpoints(tmp_path)]
    assert names == ["checkpoint-2", "checkpoint-3", "checkpoint-6", "checkpoint-8"]
    assert json.loads((tmp_path / RUN_FILE).read_text())["run_id"] == run.run_id


def test_a_resumed_run_continues_its_lineage_and_adopts_an_older_versions_checkpoints(tmp_path):
    run = RunDirectory(tmp_path, ALONE)
    assert run.adopt({"step": 4, "run_id": "abc"}) == "abc"
    assert run.owns({"run_id": "abc"}) and not run.owns({"run_id": "other"})
    assert not run.owns({"step": 1}), "a checkpoint recording no run is not ours unless we resumed one"
    older = RunDirectory(tmp_path / "old", ALONE)
    (tmp_path / "old").mkdir()
    older.adopt({"step": 4})  # saved by a version that recorded no run id
    assert older.owns({"step": 1}) and not older.owns({"run_id": "abc"})


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    first = opened(tmp_path)
    try:
        with pytest.raises(LeaseHeld) as refused:
            opened(tmp_path)
        assert f"pid {os.getpid()}" in str(refused.value) and socket.gethostname() in str(refused.value)
    finally:
        first.close()
    opened(tmp_path).close()  # free again once released


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("case", ["crashed", "pid_reused"])
def test_a_crashed_holder_in_this_pid_space_is_taken_over_at_once(tmp_path, case):
    """A restart after a crash on the same machine: the holder renewed a moment ago, but its process is visibly gone
    (same host, boot and pid namespace: the pid's state here is its state), or its pid now names another process
    (a start time other than the holder's). Either way there is nothing to wait for; it used to wait 20 s."""
    from pipeline.shards.lease import this_pid_space

    store = Store(str(tmp_path))
    pid, started = (dead_pid(), None) if case == "crashed" else (os.getpid(), -1)
    holder = {"run_id": "crashed", "host": socket.gethostname(), "pid": pid, "pid_space": this_pid_space()}
    store.write_json(LEASE_FILE, {**holder, "started": started, "renewed": time.time()})
    began = time.monotonic()
    lease = RankLease(store, 0, wait=60, renew_every=10.0, path=LEASE_FILE, what="the run folder")
    lease.release()
    # taken at once: 0.2 s of the claim's own double check; the old rule waited two renewal periods (20 s) after
    # the holder's last renewal, so any bound well between the two tells them apart on a loaded machine too
    assert time.monotonic() - began < 5, "a crashed holder on this machine is waited for"


def test_a_live_holder_in_this_pid_space_is_refused_at_once(tmp_path):
    from pipeline.shards.lease import process_start, this_pid_space

    store = Store(str(tmp_path))
    store.write_json(LEASE_FILE, {"run_id": "live", "host": socket.gethostname(), "pid": os.getpid(),
                                  "pid_space": this_pid_space(), "started": process_start(os.getpid()),
                                  "renewed": time.time()})  # fmt: skip
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
        RankLease(store, 0, wait=60, renew_every=10.0, path=LEASE_FILE, what="the run folder")


def test_a_recent_renewal_counts_as_alive_whatever_the_pid_says(tmp_path):
    """A holder in another container with the same host name: its pid is not visible here, its renewals are."""
    store = Store(str(tmp_path))
    invisible = 2**22 + 12345  # above Linux's pid_max default: no such process here
    stop = threading.Event()

    def renew():
        while not stop.is_set():
            store.write_json(LEASE_FILE, {"run_id": "other", "host": socket.gethostname(), "pid": invisible,
                                          "pid_space": "another container", "renewed": time.time()})  # fmt: skip
            stop.wait(0.2)

    holder = threading.Thread(target=renew, daemon=True)
    holder.start()
    try:
        time.sleep(0.3)
        with pytest.raises(LeaseHeld):  # renewals every 0.2 s; "recent" is within 2 of the claimant's 1 s periods
            RankLease(store, 0, wait=5, renew_every=1.0, path=LEASE_FILE, what="the run folder")
    finally:
        stop.set()
        holder.join()
    # the same holder, gone: its last renewal is older than two periods, so the lease is taken at once
    store.write_json(LEASE_FILE, {"run_id": "other", "host": socket.gethostname(), "pid": invisible,
                                  "pid_space": "another container", "renewed": 0})  # fmt: skip
    started = time.monotonic()
    lease = RankLease(store, 0, wait=30, renew_every=0.2, path=LEASE_FILE, what="the run folder")
    lease.release()
    # taken at once: 0.2 s of the claim's own double check; waiting for the holder would take the whole wait (30 s),
    # so any bound well between the two tells them apart, on a loaded machine too
    assert time.monotonic() - started < 5, "a dead holder on this host is not waited for"
