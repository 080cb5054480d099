"""pipeline/train/stream/trace.py: the data trace, one line per step and rank, cut back to a resumed step."""

from __future__ import annotations

import json

from pipeline.train.stream.trace import TraceWriter, truncate_trace


def batch(rank: int) -> dict:
    return {"rank": rank, "task": "t", "num_sources": 1, "bucket": [1, 1], "keys": ["k"], "elements": [5],
            "variants": ["en"], "texts": ["x"]}  # fmt: skip


def test_a_resume_drops_the_steps_it_trains_again_and_a_torn_last_line(tmp_path):
    path = tmp_path / "trace.jsonl"
    writer = TraceWriter(str(path))
    for step in (1, 2, 3, 4):
        writer.write(step, batch(0))
    writer.close()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"step": 5, "ra')  # the kill tore the last line
    assert truncate_trace(str(path), 2) == 3  # steps 3 and 4, and the torn line
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert truncate_trace(str(path), 2) == 0 and not (tmp_path / "trace.jsonl.tmp").exists()


def test_no_trace_asked_writes_nothing_and_cuts_nothing(tmp_path):
    writer = TraceWriter(None)
    writer.write(1, batch(0))
    writer.close()
    assert truncate_trace(None, 3) == 0 and truncate_trace(str(tmp_path / "missing.jsonl"), 3) == 0
    assert list(tmp_path.iterdir()) == []
