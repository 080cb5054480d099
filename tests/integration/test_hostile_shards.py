"""Shards built to hurt the tools: symlinks, hardlinks, names that leave the folder, lone members, a cut-short
``.npy``, a truncated tar. verify names each; reshard records each in ``_failures/`` and copies the rest;
preview reports them; nothing is written outside the output."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_the_clis_report_hostile_shards_and_exit_1_without_a_traceback(hostile, tmp_path):
    from helpers import no_traceback_of_ours, run_module

    task, hits = hostile
    shown = run_module("shards_tools", "preview", str(task), "--out", str(tmp_path / "sheet.png"), "--samples", "30")
    assert shown.returncode == 1 and no_traceback_of_ours(shown.stderr)
    assert all(key in shown.stdout for key in hits.values()) and (tmp_path / "sheet.png").exists()
    copied = run_module(
        "shards_tools", "reshard", str(task), "--output_dir", str(tmp_path / "r"), "--max_samples_per_shard", "4"
    )
    assert (
        copied.returncode == 1 and "above --max_failure_ratio" in copied.stderr and no_traceback_of_ours(copied.stderr)
    )
    checked = run_module("shards_tools", "verify", str(task))
    assert checked.returncode == 1 and hits["escape"] in checked.stdout
