"""Extraction throughput: wall time of a real run vs the encoder forward alone on the same prompts.

    python benchmarks/bench_extract.py --samples 16 --num_workers 1 --batch_size 4

Builds the ``bench``-size random model and the sample data (cached under
--work_dir), runs the real extraction once, then replays exactly the same
encoder batches from memory; both after one warm-up pass over every batch shape.
Prints wall/forward (the target is <= 1.15: loading, preprocessing and shard
writing hidden behind the encoder), samples/s and MB/s written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "bench-extract"))
    p.add_argument("--samples", type=int, default=16, help="samples per sample-data task (3 tasks)")
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--batching", choices=["padded", "exact"], default="padded")
    p.add_argument("--size", default="bench", choices=["tiny", "bench"])
    args = p.parse_args()

    from pipeline.common.logs import setup_logging
    from pipeline.common.records import Columns
    from pipeline.extract.cli import build_parser
    from pipeline.extract.extractor import Extractor, PromptBatcher
    from pipeline.extract.prepare import LineDataset, PreparedSample, PrepareOptions
    from pipeline.kit.sample_data import combined_jsonl, make_sample_data
    from pipeline.kit.tiny_model import make_tiny_model

    setup_logging()
    work = Path(args.work_dir)
    model = work / f"model-{args.size}"
    if not (model / "model_index.json").exists():
        make_tiny_model(model, seed=0, size=args.size)
    data = work / f"data-{args.samples}"
    if not data.exists():
        make_sample_data(data, samples=args.samples, seed=0)
    jsonl = combined_jsonl(data, work / f"mixed-{args.samples}.jsonl")
    out = work / "out" / "mixed"
    shutil.rmtree(out, ignore_errors=True)

    cli = build_parser().parse_args(
        [
            str(jsonl),
            "--output_dir",
            str(out),
            "--model_path",
            str(model),
            "--num_workers",
            str(args.num_workers),
            "--batch_size",
            str(args.batch_size),
            "--batching",
            args.batching,
            "--max_samples_per_shard",
            "16",
        ]
    )
    extractor = Extractor(cli, 0, 1)

    # The same prompts, prepared up front and grouped by the same batcher: the forward-only baseline.
    dataset = LineDataset(str(jsonl), 0, 1, np.zeros(0, bool), extractor.builder, PrepareOptions(), Columns())
    batcher = PromptBatcher(args.batch_size, args.batching == "exact", max(64, 16 * args.batch_size))
    batches = []
    for sid, item in enumerate(dataset):
        if isinstance(item, PreparedSample):
            for variant, inputs in item.prompts:
                batches.extend(batcher.add(sid, variant, inputs))
    batches.extend(batcher.drain())

    def replay() -> float:
        t0 = time.perf_counter()
        for batch in batches:
            extractor.encoder.encode([p for _, _, p in batch], extractor.builder.drop_index)
        return time.perf_counter() - t0

    # CPU kernels are planned per tensor shape on first use; warm every shape once so that
    # neither measurement pays for it and the ratio shows only what the pipeline adds.
    warmup = replay()
    stats = extractor.run()
    extractor.finish()
    forward_alone = replay()
    wall = stats["wall_seconds"]
    prompts = sum(len(b) for b in batches)
    result = {
        "samples": stats["samples_written"],
        "prompts": prompts,
        "encoder_batches": len(batches),
        "mean_batch": round(prompts / len(batches), 2),
        "prompts_per_forward_in_run": round(stats["prompts_per_forward"], 2),
        "wall_s": round(wall, 2),
        "forward_in_run_s": round(stats["forward_seconds"], 2),
        "forward_alone_s": round(forward_alone, 2),
        "cold_forward_s": round(warmup, 2),
        "wall_over_forward_alone": round(wall / forward_alone, 3),
        "samples_per_s": round(stats["samples_written"] / wall, 2),
        "MB_per_s_written": round(stats["bytes_written"] / 1e6 / wall, 2),
        "num_workers": args.num_workers,
        "batching": args.batching,
        "model": args.size,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
