"""``--data_only``: the real loader without a model — the trace, checkpoints of the data state, exact resume.

The loader benchmarks and the stream's resume tests run through here, with the same
run folder (lease, fresh or resumed), the same checkpoint manager (the data part
alone) and the same resume rules as a training run.
"""

from __future__ import annotations

import logging
import time

from pipeline.common.collective import Collective
from pipeline.common.process_group import distributed_env, join_process_group
from pipeline.train.config import TrainConfig
from pipeline.train.engine.checkpoint.manager import CheckpointManager
from pipeline.train.engine.checkpoint.parts import DataPart
from pipeline.train.engine.run_dir import RunDirectory, run_names
from pipeline.train.stream.loader import build_dataset, build_loader, next_batch, stop_workers
from pipeline.train.stream.trace import TraceWriter

log = logging.getLogger("pipeline.train")


def run_data_only(config: TrainConfig) -> int:
    """The real loader without a model: trace, checkpoints of the data state, exact resume."""
    env = distributed_env()
    join_process_group("cpu", timeout_s=config.ddp_timeout)
    collective = Collective(env.rank, env.world, config.ddp_timeout)
    run = RunDirectory(config.output_dir, collective, run_names(config))
    try:
        checkpoint = config.checkpoint
        run.open(checkpoint.resume_from, checkpoint.overwrite)
        checkpoints = CheckpointManager(
            config.output_dir, collective, run=run, mode={"data_only": True, "world_size": env.world},
            every=checkpoint.every, total_limit=checkpoint.total_limit, trace_path=config.data.trace_path,
        )  # fmt: skip
        checkpoints.choose(checkpoint.resume_from)
        dataset = build_dataset(config.data, config.stream, env.rank, env.world)
        loader = build_loader(dataset, config.data)
        checkpoints.register({"data": DataPart(loader, env.rank, env.world)})
        start = checkpoints.load()
        trace = TraceWriter(config.data.trace_path)
        started, waited, batches = time.perf_counter(), 0.0, iter(loader)
        try:
            for step in range(start, config.max_train_steps):
                batch, wait = next_batch(batches, step)
                waited += wait
                trace.write(step + 1, batch)
                if checkpoints.due(step + 1, config.max_train_steps):
                    checkpoints.save(step + 1)
        finally:
            trace.close()
            stop_workers(batches)
    finally:
        run.close()
    elapsed = time.perf_counter() - started
    steps = config.max_train_steps - start
    log.info(
        "%d steps in %.1fs (%.2f steps/s), waiting for data %.1fs", steps, elapsed, steps / max(elapsed, 1e-9), waited
    )
    return 0
