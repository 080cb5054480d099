"""``--data_only``: the real loader without a model — the trace, checkpoints of the data state, exact resume.

The loader benchmarks and the stream's resume tests run through here, with the same
checkpointer (the data part alone) and the same resume rules as a training run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from pipeline.common.flags import distributed_env, join_process_group, leave_process_group
from pipeline.train.config import TrainConfig
from pipeline.train.engine import checkpoint as ckpt
from pipeline.train.stream.loader import TraceWriter, build_dataset, build_loader, next_batch, truncate_trace

log = logging.getLogger("pipeline.train")


def run_data_only(config: TrainConfig) -> int:
    """The real loader without a model: trace, checkpoints of the data state, exact resume."""
    env = distributed_env()
    rank, world = env.rank, env.world
    join_process_group("cpu")

    def barrier() -> None:
        if world > 1:
            torch.distributed.barrier()

    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(config.data, config.stream, rank, world)
    loader = build_loader(dataset, config.data)
    checkpointer = ckpt.Checkpointer(
        config.output_dir,
        rank,
        barrier,
        {"data": ckpt.DataPart(loader, rank, world)},
        {"data_only": True, "world_size": world},
        config.checkpoint.total_limit,
        world,
    )
    start = 0
    resume = ckpt.resume_point(config.output_dir, config.checkpoint.resume_from, rank, world, "cpu")
    if resume is not None:
        start = checkpointer.load(resume)
        log.info("resuming data at step %d from %s", start, resume)
        if rank == 0:
            truncate_trace(config.data.trace_path, start)
        barrier()
    trace = TraceWriter(config.data.trace_path)
    started, waited, batches = time.perf_counter(), 0.0, iter(loader)
    try:
        for step in range(start, config.max_train_steps):
            batch, wait = next_batch(batches, step)
            waited += wait
            trace.write(step + 1, batch)
            done = step + 1
            if done % config.checkpoint.every == 0 or done == config.max_train_steps:
                checkpointer.save(done)
    finally:
        trace.close()
    elapsed = time.perf_counter() - started
    steps = config.max_train_steps - start
    log.info(
        "%d steps in %.1fs (%.2f steps/s), waiting for data %.1fs", steps, elapsed, steps / max(elapsed, 1e-9), waited
    )
    leave_process_group()
    return 0
