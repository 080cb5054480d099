"""pipeline/train/engine/data_only.py: the real loader without a model, resumed through the checkpoint manager.

In-process, one rank, no workers: a run of 4 steps saving every 2, a resume from
``latest`` to 6 (the manager chooses, adopts the lineage, loads the data part and cuts
the trace), and a fresh start over the folder refused.
"""

from __future__ import annotations

import json

import pytest
from helpers import synthetic_task

from pipeline.errors import UserError
from pipeline.train.cli import build_parser
from pipeline.train.config import config_from_args
from pipeline.train.engine.data_only import run_data_only


def config(tmp_path, steps: int, *extra: str):
    flags = ["--data_only", "--train_data_meta_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"),
             "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--train_batch_size", "2",
             "--image_sample_size", "32", "--dataloader_num_workers", "0", "--report_to", "none",
             "--data_trace", str(tmp_path / "run" / "trace.jsonl"), *extra]  # fmt: skip
    return config_from_args(build_parser().parse_args(flags))


def test_a_resumed_data_run_goes_on_from_its_checkpoint_and_traces_every_step_once(tmp_path):
    synthetic_task(tmp_path / "data", "t", samples=20, per_shard=5)
    assert run_data_only(config(tmp_path, 4)) == 0
    with open(tmp_path / "run" / "trace.jsonl", "a") as trace:
        trace.write('{"step": 5, "torn')  # a kill during step 5 after the last checkpoint
    assert run_data_only(config(tmp_path, 6, "--resume_from_checkpoint", "latest")) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "trace.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    elements = [e for line in lines[:5] for e in line["elements"]]  # 10 of the 20 samples: none twice in the epoch
    assert len(set(elements)) == len(elements)
    markers = [json.loads((tmp_path / "run" / f"checkpoint-{s}" / "checkpoint.json").read_text()) for s in (4, 6)]
    assert markers[0]["run_id"] == markers[1]["run_id"], "the resume went on in the run's lineage"
    assert markers[1]["data_only"] is True and markers[1]["world_size"] == 1


def test_a_fresh_start_over_a_folder_with_checkpoints_is_refused(tmp_path):
    synthetic_task(tmp_path / "data", "t", samples=8, per_shard=4)
    run_data_only(config(tmp_path, 2))
    with pytest.raises(UserError, match="--resume_from_checkpoint latest"):
        run_data_only(config(tmp_path, 2))
