"""Training step time with the real loader vs the same batches pre-built in memory (the data-stall fraction).

    python benchmarks/bench_train.py --steps 30 --workers 2

Uses the tiny model and the sample data (built under --work_dir).  Run 1 trains
with the real StatefulDataLoader; run 2 replays exactly the batches run 1 saw,
held in memory.  Prints mean step time of both, their ratio and the data-wait
fraction of run 1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "bench-train"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--image_sample_size", type=int, default=256)
    args = p.parse_args()

    from pipeline.common.logs import setup_logging
    from pipeline.demo import extract_tasks
    from pipeline.kit.sample_data import make_sample_data
    from pipeline.kit.tiny_model import make_tiny_model
    from pipeline.train.cli import build_parser
    from pipeline.train.config import config_from_args
    from pipeline.train.engine.trainer import Trainer
    from pipeline.train.stream.trace import TraceWriter

    setup_logging()
    work = Path(args.work_dir)
    model = work / "model"
    if not (model / "model_index.json").exists():
        make_tiny_model(model)
    shards = work / "shards"
    if not shards.exists():
        extract_tasks(make_sample_data(work / "data", samples=16), shards, model, max_samples_per_shard=8)
    cli = build_parser().parse_args(
        [
            "--pretrained_model_name_or_path",
            str(model),
            "--train_data_meta_dir",
            str(shards),
            "--output_dir",
            str(work / "run"),
            "--max_train_steps",
            str(args.steps),
            "--checkpointing_steps",
            "100000",
            "--train_batch_size",
            str(args.batch_size),
            "--image_sample_size",
            str(args.image_sample_size),
            "--dataloader_num_workers",
            str(args.workers),
            "--report_to",
            "none",
            "--learning_rate",
            "1e-4",
        ]
    )
    config = config_from_args(cli)
    trainer = Trainer(config)
    trainer.setup()
    trace = TraceWriter(None)

    class Recording:
        """The real loader, remembering each batch so the baseline can replay exactly the same ones."""

        def __init__(self, batches):
            self.batches, self.seen, self.waited = batches, [], 0.0

        def __next__(self):
            t0 = time.perf_counter()
            batch = next(self.batches)
            self.waited += time.perf_counter() - t0
            self.seen.append(batch)
            return batch

    # the real step (pipeline.train.engine.trainer.Trainer.train_step) fed by the real loader ...
    recording = Recording(iter(trainer.loader))
    t_all = time.perf_counter()
    for i in range(args.steps):
        trainer.train_step(i, recording, trace)
    real = (time.perf_counter() - t_all) / args.steps
    waits = recording.waited

    # ... and the same step replaying those batches from memory
    torch.manual_seed(0)
    replay = iter(recording.seen)
    t_all = time.perf_counter()
    for i in range(args.steps):
        trainer.train_step(i, replay, trace)
    memory = (time.perf_counter() - t_all) / args.steps
    print(
        json.dumps(
            {
                "steps": args.steps,
                "workers": args.workers,
                "batch_size": args.batch_size,
                "image_sample_size": args.image_sample_size,
                "step_s_real_loader": round(real, 4),
                "step_s_prebuilt_batches": round(memory, 4),
                "ratio": round(real / memory, 3),
                "data_wait_fraction": round(waits / (real * args.steps), 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
