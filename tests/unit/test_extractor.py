"""pipeline/extract/extractor.py, with the line's preparation (prepare.py) and the task directory it writes
(shards/taskdir.py): one rank's extraction of a small JSONL on the tiny model, a bad line, and a rerun."""

from __future__ import annotations

import json

import pytest

from pipeline.extract.config import ExtractConfig
from pipeline.extract.extractor import Extractor
from pipeline.extract.prepare import PrepareOptions
from pipeline.shards.lease import LeaseHeld
from pipeline.shards.taskdir import TaskDirectory

SPECIFIES = ("pipeline.extract.prepare", "pipeline.shards.taskdir")


@pytest.fixture
def small_jsonl(sample_data_dir, tmp_path):
    """Three lines of the sample edits (images by absolute path) and one whose target does not exist."""
    source = sample_data_dir / "edit_single" / "data.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()[:3]]
    for row in rows:
        for key in ("source_image", "target_image"):
            row[key] = str(source.parent / row[key])
    rows.append({**rows[0], "target_image": str(tmp_path / "missing.png")})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def extract(jsonl, out, model) -> dict:
    config = ExtractConfig(jsonl_path=str(jsonl), output_dir=str(out), model_path=str(model), num_workers=0)
    extractor = Extractor(config, 0, 1)
    stats = extractor.run()
    assert extractor.finish() == 1  # one line of four failed: more than the 5 % allowed
    return stats


def test_one_rank_writes_every_line_once_to_a_shard_or_the_failures_and_a_rerun_does_nothing(
    small_jsonl, tmp_path, tiny_model_dir
):
    out = tmp_path / "task"
    stats = extract(small_jsonl, out, tiny_model_dir)
    assert stats["samples_written"] == 3 and stats["failed"] == {"missing_image": 1}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 3 and manifest["failures"] == 1
    failure = json.loads((out / "_failures" / "rank-0.jsonl").read_text().splitlines()[0])
    assert failure["line"] == 3 and failure["field"] == "target_image"
    again = extract(small_jsonl, out, tiny_model_dir)
    assert again["samples_written"] == 0, "the rerun found every line done"


def test_a_second_writer_of_a_rank_is_refused_while_the_first_holds_it(tmp_path):
    task = TaskDirectory(str(tmp_path / "task"), None, {"input": "x"}, "start fresh elsewhere")
    first = task.lease(0)
    try:
        with pytest.raises(LeaseHeld, match="another run"):
            TaskDirectory(str(tmp_path / "task"), None, {"input": "x"}, "start fresh elsewhere").lease(0)
    finally:
        first.release()


def test_preparing_takes_the_runs_options_of_the_same_names():
    from pipeline.common.options import derived

    config = ExtractConfig(jsonl_path="a", output_dir="o", model_path="m", max_image_pixels=7, fetch_timeout=3.0)
    opts = derived(PrepareOptions, config, inverse=False, storage_options=None)
    assert (opts.max_image_pixels, opts.fetch_timeout, opts.inverse) == (7, 3.0, False)
    with pytest.raises(TypeError, match="inverse"):
        derived(PrepareOptions, config, storage_options=None)  # a field neither the config has nor the caller gives
