"""From a :class:`DataConfig` to the loader the loop iterates: tasks (``startup``) → stream → StatefulDataLoader.

Also what every loop over that loader shares: the step check on each batch and
shutting its workers down. The trace is ``trace.py``; the loader's state and its
resume on another layout are ``state.py``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.common.workers import stream_worker_init
from pipeline.train.config.data import DataConfig, StreamConfig
from pipeline.train.stream.dataset import MixedBatchDataset
from pipeline.train.stream.errors import DATA_ERROR, UnusableData
from pipeline.train.stream.startup import load_tasks, mix_tasks

log = logging.getLogger("pipeline.train")


def build_dataset(
    data: DataConfig, stream: StreamConfig, rank: int, world: int, tasks: dict | None = None
) -> MixedBatchDataset:
    """The run's dataset over ``tasks`` (read here when not given: the trainer reads them before the model)."""
    tasks = tasks if tasks is not None else load_tasks(data, stream.storage_options)
    return MixedBatchDataset(tasks, mix_tasks(tasks, data, stream, rank), rank, world, stream)


def build_loader(dataset: MixedBatchDataset, data: DataConfig):
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(
        dataset,
        batch_size=None,
        num_workers=data.num_workers,
        worker_init_fn=stream_worker_init,
        prefetch_factor=data.prefetch_factor if data.num_workers else None,
        persistent_workers=False,
    )


def next_batch(batches, expected_step: int) -> tuple[dict[str, Any], float]:
    """The next batch and the seconds spent waiting for it; checks it is the step the loop expects."""
    t0 = time.perf_counter()
    batch = next(batches)
    waited = time.perf_counter() - t0
    if DATA_ERROR in batch:  # a worker's stream stopped: its own line, as without workers
        raise UnusableData(batch[DATA_ERROR])
    if batch["step"] != expected_step:
        raise RuntimeError(f"loader produced step {batch['step']} where {expected_step} was expected")
    return batch, waited


def stop_workers(batches) -> None:
    """Shut a loader iterator's worker processes down now (a no-op without workers)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
