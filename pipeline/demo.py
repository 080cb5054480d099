"""``python -m pipeline.demo``: the whole workflow on the embedded tiny model, offline, in a few minutes.

sample data → extraction to shards → training with a checkpoint, a stop, a
resume and validation images → export → diffusers inference with the trained
transformer.  Every step
runs the same CLI entry points a user runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import families
from pipeline.common.logs import setup_logging
from pipeline.common.options import Checked, add_options, at_least, from_flags, option
from pipeline.errors import USER_EXIT, UserError

log = logging.getLogger("pipeline.demo")
TASKS = ("edit_single", "compose_multi", "text_to_image")


def extract_tasks(data: dict[str, Path], shards: Path, model: Path, max_samples_per_shard: int) -> int:
    """``python -m pipeline.extract`` for every task's JSONL into ``shards/<task>``; first non-zero exit code."""
    from pipeline.extract import cli as extract

    for task, jsonl in data.items():
        code = extract.main(
            [
                str(jsonl),
                "--output_dir",
                str(shards / task),
                "--model_path",
                str(model),
                "--num_workers",
                "1",
                "--max_samples_per_shard",
                str(max_samples_per_shard),
                "--condition_resolution",  # Qwen-Image 2.1's conditions (other families ignore it): quick on a CPU
                "384",
            ]
        )
        if code:
            return code
    return 0


def write_validation_rows(data: dict[str, Path], path: Path) -> Path:
    """Two validation rows: an edit of a sample-data source, and a text-to-image prompt in Chinese."""
    import json

    from pipeline.common.records import read_records

    edit = next(r for r in read_records(str(data["edit_single"])) if not isinstance(r, Exception))
    rows = [
        {"source_image": edit.sources, "instruction": edit.instruction},
        {"source_image": None, "instruction": "一只猫坐在窗台上。"},
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@dataclass
class DemoOptions(Checked):
    """``python -m pipeline.demo``'s options (the flags are these fields)."""

    work_dir: str | None = option(None, "where to write everything (default: a new temp folder)")
    samples: int = option(8, "samples per sample-data task", check=at_least(1))
    steps: int = option(20, "training steps (a checkpoint and resume at half)", check=at_least(2))
    family: str = option(
        "qwen_edit",
        "the tiny model's family: qwen_edit (Qwen-Image-Edit 2509 layout, default) or qwen_image21",
        choices=tuple(sorted(families.FAMILIES)),
    )


def training_flags(model: Path, shards: Path, run: Path, validation: Path, half: int, steps: int, family) -> list[str]:
    """The demo's training command line (both halves of the run: the stop at ``half`` and the resume)."""
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_meta_dir",
        str(shards),
        "--train_data_weights",
        "edit_single=1,compose_multi=1,text_to_image=0.5",
        "--train_src_img_num_weights",
        "0=1,1=2,2=1,3=1",
        "--train_batch_size",
        str(min(2, family.max_batch_size or 2)),
        "--image_sample_size",
        "128",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler",
        "constant_with_warmup",
        "--lr_warmup_steps",
        "2",
        "--checkpointing_steps",
        str(half),
        "--output_dir",
        str(run),
        "--dataloader_num_workers",
        "1",
        "--enable_inverse",
        "--uniform_sampling",
        "--data_trace",
        str(run / "trace.jsonl"),
        "--validation_jsonl",
        str(validation),
        "--validation_steps",
        str(steps),
        "--validation_inference_steps",
        "4",
    ]


def infer(family, model: Path, run: Path, data: dict[str, Path]) -> Path:
    """diffusers inference with the trained transformer on a sample-data edit; the image's path."""
    import torch
    from diffusers.utils import load_image

    from pipeline.common.records import read_records

    pipe = family.inference_pipeline(str(model), str(run / "transformer"))
    record = next(r for r in read_records(str(data["edit_single"])) if not isinstance(r, Exception))
    image = family.render_edit(  # about 256²: quick CPU inference with the tiny VAE
        pipe, [load_image(record.sources[0])], record.instruction, family.validation_resolution(256 * 256), 4,
        torch.Generator().manual_seed(0),
    )  # fmt: skip
    result = run / "demo_inference.png"
    image.save(result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__)
    add_options(parser, DemoOptions)
    try:
        opts = from_flags(DemoOptions, parser.parse_args(argv))
    except UserError as exc:
        print(f"python -m pipeline.demo: {exc}", file=sys.stderr)
        return USER_EXIT
    family = families.get(opts.family)
    setup_logging()
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="qwen-edit-demo-"))
    started = time.perf_counter()

    from pipeline.kit.sample_data import make_sample_data
    from pipeline.kit.tiny_model import make_tiny_model
    from pipeline.train import cli as train

    model = make_tiny_model(work / "tiny-model", seed=0, family=family.name)
    log.info("1/5 tiny model: %s", model)
    data = make_sample_data(work / "sample-data", samples=opts.samples, seed=0)
    log.info("2/5 sample data: %s", ", ".join(str(p) for p in data.values()))

    shards = work / "shards"
    code = extract_tasks(data, shards, model, max_samples_per_shard=4)
    if code:
        return code
    log.info("3/5 shards: %s (manifest.json per task)", shards)

    run = work / "run"
    half = max(1, opts.steps // 2)
    validation = write_validation_rows(data, work / "validation.jsonl")
    common = training_flags(model, shards, run, validation, half, opts.steps, family)
    train.main([*common, "--max_train_steps", str(half)])
    log.info("4/5 trained %d steps, stopped; resuming from %s", half, run / f"checkpoint-{half}")
    train.main([*common, "--max_train_steps", str(opts.steps), "--resume_from_checkpoint", "latest"])

    result = infer(family, model, run, data)
    log.info("5/5 inference with the trained transformer: %s", result)
    print(
        "\n".join(
            [
                "",
                f"demo finished in {time.perf_counter() - started:.0f}s; outputs under {work}",
                f"  tiny model          {model}",
                f"  sample data         {work / 'sample-data'}",
                f"  shards + manifests  {shards}",
                f"  checkpoints         {run}/checkpoint-*",
                f"  data trace          {run / 'trace.jsonl'}",
                f"  first-batch sheet   {run / 'first_batch.png'}",
                f"  validation images   {run / 'validation'}/step-*/sheet.png",
                f"  recipe (resolved)   {run / 'config.yaml'}",
                f"  TensorBoard logs    {run / 'logs'}",
                f"  trained transformer {run / 'transformer'}",
                f"  inference result    {result}",
            ]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
