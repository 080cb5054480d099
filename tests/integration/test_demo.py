"""The README's demo command runs end to end and leaves every output it announces."""

from __future__ import annotations

import pytest
from helpers import run_module

# integration: subprocess runs of the real CLIs on the tiny model (servers, torchrun, SIGKILL)
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", ["qwen_edit", "qwen_image21"])
def test_demo_runs_the_whole_workflow(tmp_path, family):
    result = run_module(
        "pipeline.demo", "--work_dir", str(tmp_path), "--steps", "6", "--samples", "4", "--family", family, check=True
    )
    assert "demo finished" in result.stdout
    run = tmp_path / "run"
    for path in ("checkpoint-3", "checkpoint-6", "transformer", "first_batch.png", "demo_inference.png", "trace.jsonl"):
        assert (run / path).exists(), path
    assert "resumed from" in result.stderr
    for step in (3, 6):  # the stop at half renders too: validation happens at every run's last step
        assert (run / "validation" / f"step-{step:06d}" / "sheet.png").exists()
    assert (run / "config.yaml").exists()
    assert len((run / "trace.jsonl").read_text().splitlines()) == 6
    for task in ("edit_single", "compose_multi", "text_to_image"):
        assert (tmp_path / "shards" / task / "manifest.json").exists()
