"""The trainer: it learns, trains only what it should, resumes bit for bit, exports what diffusers loads."""

from __future__ import annotations

import json

import pytest


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    from pipeline.train.engine import checkpoint as ckpt

    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / ckpt.MARKER).write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint-6").mkdir()  # crashed before the marker
    (tmp_path / ".checkpoint-8.incomplete").mkdir()
    assert ckpt.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-4"
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoint-6"))
    ckpt.prune(tmp_path, 1)
    assert [p.name for _, p in ckpt.complete_checkpoints(tmp_path)] == ["checkpoint-4"]
