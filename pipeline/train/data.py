"""From a :class:`DataConfig` to the loader the loop iterates: tasks → mix plan → stream → StatefulDataLoader.

Also what every loop over that loader shares: the step check on each batch,
the per-step trace, and the loader state as plain JSON for checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipeline.shards.tasks import DataConfigError, Task, discover_tasks, task_from_patterns
from pipeline.train.config import DataConfig, StreamConfig
from pipeline.train.stream import MixedBatchDataset, plan_mix

log = logging.getLogger("pipeline.train")


def load_tasks(data: DataConfig, storage_options: dict | None) -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    if data.meta_dir:
        tasks.update(discover_tasks(data.meta_dir, storage_options))
    for name, patterns in data.shard_patterns.items():
        tasks[name] = task_from_patterns(name, patterns, storage_options)
    if not tasks:
        raise DataConfigError("give --train_data_meta_dir or --train_shards")
    return tasks


def build_dataset(data: DataConfig, stream: StreamConfig, rank: int, world: int) -> MixedBatchDataset:
    tasks = load_tasks(data, stream.storage_options)
    task_weights = data.task_weights if data.task_weights is not None else {name: 1.0 for name in tasks}
    plan = plan_mix(tasks, task_weights, data.source_count_weights)
    if rank == 0:
        log.info("mix: N %s; tasks per N %s", plan.n_probs, plan.task_probs)
    return MixedBatchDataset(tasks, plan, rank, world, stream)


def build_loader(dataset: MixedBatchDataset, data: DataConfig):
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(
        dataset,
        batch_size=None,
        num_workers=data.num_workers,
        prefetch_factor=data.prefetch_factor if data.num_workers else None,
        persistent_workers=False,
    )


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
            "variants": batch["variants"],
            "texts": batch["texts"],
        }
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def next_batch(batches, expected_step: int) -> tuple[dict[str, Any], float]:
    """The next batch and the seconds spent waiting for it; checks it is the step the loop expects."""
    t0 = time.perf_counter()
    batch = next(batches)
    waited = time.perf_counter() - t0
    if batch["step"] != expected_step:
        raise RuntimeError(f"loader produced step {batch['step']} where {expected_step} was expected")
    return batch, waited


def json_state(state: Any) -> Any:
    """StatefulDataLoader state as plain JSON (a round trip checks nothing un-JSON-able slipped in)."""
    return json.loads(json.dumps(state))
