"""``--data_trace``: one JSON line per step and rank — what each step trained on, the exactly-once record.

A resume drops the lines after its checkpoint's step first (:func:`truncate_trace`),
so the steps it trains again are not written twice.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline.train")


def truncate_trace(path: str | None, step: int) -> int:
    """Drop the trace's lines after ``step`` (rank 0, before any rank writes again): a resume replays those steps,
    and the trace is the exactly-once record. Returns the lines dropped (a torn last line counts as one)."""
    if not path or not Path(path).is_file():
        return 0
    dropped, tmp = 0, f"{path}.tmp"
    with open(path, encoding="utf-8") as source, open(tmp, "w", encoding="utf-8") as kept:  # line by line
        for line in source:
            try:
                keep = int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):  # a line torn by the kill
                keep = False
            if keep:
                kept.write(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        os.replace(tmp, path)
        log.info("--data_trace: dropped %d line(s) after step %d, which this resume trains again", dropped, step)
    else:
        os.remove(tmp)
    return dropped


class TraceWriter:
    """One JSON line per step and rank; every rank appends to the same file, each line in one write."""

    def __init__(self, path: str | None):
        self.fd = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, step: int, batch: dict[str, Any]) -> None:
        if self.fd is None:
            return
        record = {
            "step": step,
            "rank": batch["rank"],
            "task": batch["task"],
            "num_sources": batch["num_sources"],
            "bucket": batch["bucket"],
            "keys": batch["keys"],
            "elements": batch.get("elements"),
            "variants": batch["variants"],
            "texts": batch["texts"],
        }
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
