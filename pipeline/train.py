"""``python -m pipeline.train``: stream shards, mix tasks, train (or, with ``--data_only``, just load).

Data path: tasks (``sources``) → per-(task, N) partitions and mixing
(``stream``) → batches (``batching``) → torchdata's ``StatefulDataLoader``,
whose JSON state goes into every checkpoint (``checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.logs import setup_logging
from pipeline.model import DEFAULT_LORA_TARGETS
from pipeline.sources import (
    DataConfigError,
    Task,
    discover_tasks,
    parse_shard_flags,
    task_from_patterns,
)
from pipeline.storage import parse_storage_options
from pipeline.stream import MixedBatchDataset, StreamConfig, plan_mix
from pipeline.weights import parse_weights

log = logging.getLogger("pipeline.train")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--train_data_meta_dir",
        default=None,
        help="folder or URL whose subfolders with a manifest.json are the tasks (listed once at start-up)",
    )
    g.add_argument(
        "--train_shards",
        action="append",
        default=[],
        metavar="TASK=URL_PATTERN",
        help="explicit shards of a task, brace patterns allowed (repeatable); the source count comes from the "
        "src{N}/ folder; local, s3://, gs://, http(s):// and pipe: URLs",
    )
    g.add_argument(
        "--train_data_weights",
        default=None,
        help='sampling weight per task, "task_a=0.5,task_b=1.2"; tasks not listed are not used '
        "(default: every task, weight 1)",
    )
    g.add_argument(
        "--train_src_img_num_weights",
        default="0=1,1=1,2=1,3=1",
        help='weight per number of source images, "0=1,1=1,2=1,3=0"; drawn per step, the same on every rank',
    )
    g.add_argument("--train_batch_size", type=int, default=1, help="samples per batch and rank")
    g.add_argument("--image_sample_size", type=int, default=512, help="crop area ≈ this squared (sides /32)")
    g.add_argument("--enable_inverse", action="store_true", help="also train on inverse instructions (swap roles)")
    g.add_argument("--text_drop_ratio", type=float, default=0.05, help="probability of the empty-text embedding")
    g.add_argument("--dataloader_num_workers", type=int, default=2, help="DataLoader worker processes per rank")
    g.add_argument("--prefetch_factor", type=int, default=2, help="batches each worker prepares ahead")
    g.add_argument("--shuffle_buffer", type=int, default=64, help="samples in each stream's shuffle buffer")
    g.add_argument("--seed", type=int, default=42, help="seed of every data and noise draw")
    g.add_argument(
        "--storage_options", default=None, help="JSON fsspec options, flat or per protocol (see pipeline.extract)"
    )
    g.add_argument(
        "--data_trace",
        default=None,
        help="append one JSON line per step and rank (task, N, bucket, keys, variants, texts) to this file",
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", required=True, help="checkpoints and outputs")
    g.add_argument("--max_train_steps", type=int, required=True, help="optimizer steps to run")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a checkpoint every this many steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument(
        "--resume_from_checkpoint", default=None, help='"latest" (newest complete checkpoint) or a checkpoint path'
    )
    g.add_argument("--data_only", action="store_true", help="run the real data loader without a model")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None, help="Qwen-Image-Edit(-2509) diffusers folder")
    g.add_argument("--transformer_path", default=None, help="load the transformer from this folder instead")
    g.add_argument("--vae_path", default=None, help="load the VAE from this folder instead")
    g.add_argument(
        "--trainable_modules", default=".", help='full fine-tuning: parameter-name substrings that train ("." = all)'
    )
    g.add_argument(
        "--trainable_modules_low_learning_rate", default="", help="substrings of parameters trained at half the LR"
    )
    g.add_argument("--use_peft_lora", action="store_true", help="train a LoRA adapter instead of full weights")
    g.add_argument("--lora_rank", type=int, default=64, help="LoRA rank")
    g.add_argument("--lora_alpha", type=float, default=64, help="LoRA alpha")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout")
    g.add_argument("--lora_target_modules", default=DEFAULT_LORA_TARGETS, help="comma-separated LoRA target modules")
    g.add_argument("--lora_path", default=None, help="initialise the LoRA from this safetensors file")
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--vae_mini_batch", type=int, default=1, help="images per VAE encode call")
    g.add_argument(
        "--condition_encoder_mode",
        choices=["offline", "sync"],
        default="offline",
        help="offline: embeddings from the shards; sync: encode prompts during training from the shard's images "
        "and text with the extraction code (for shards made with --skip_embeddings)",
    )
    g.add_argument("--prompt_style", choices=["diffusers", "firered"], default="diffusers", help="for sync mode")

    o = p.add_argument_group("optimisation")
    o.add_argument("--learning_rate", type=float, default=1e-5, help="peak learning rate")
    o.add_argument("--scale_lr", action="store_true", help="multiply the LR by accumulation × batch × processes")
    o.add_argument("--lr_scheduler", default="constant", help="diffusers get_scheduler name (constant_with_warmup …)")
    o.add_argument("--lr_warmup_steps", type=int, default=0, help="warm-up steps")
    o.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    o.add_argument(
        "--num_train_epochs",
        type=int,
        default=1,
        help="kept for compatibility; the stream is endless and --max_train_steps decides the length",
    )
    o.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    o.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    o.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    o.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    o.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (must be installed)")
    o.add_argument("--use_came", action="store_true", help="CAME optimizer (came-pytorch must be installed)")
    o.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    o.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="accelerate mixed precision")
    o.add_argument("--train_sampling_steps", type=int, default=1000, help="T of the sigma schedule")
    o.add_argument("--uniform_sampling", action="store_true", help="timestep index range split evenly across ranks")
    o.add_argument(
        "--weighting_scheme",
        choices=["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"],
        default="none",
        help="timestep density and SD3 loss weighting",
    )
    o.add_argument("--logit_mean", type=float, default=0.0, help="mean of logit_normal timestep sampling")
    o.add_argument("--logit_std", type=float, default=1.0, help="std of logit_normal timestep sampling")
    o.add_argument("--mode_scale", type=float, default=1.29, help="scale of mode timestep sampling")
    o.add_argument("--report_to", default="tensorboard", help="tensorboard (default), wandb, or none")
    o.add_argument("--export_checkpoint", default=None, help="export this checkpoint for diffusers and exit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train a Qwen-Image-Edit transformer on WebDataset shards mixed by task and source count.",
    )
    add_data_arguments(p)
    add_run_arguments(p)
    add_model_arguments(p)
    return p


# ---------------------------------------------------------------------------------------------


def load_tasks(args: argparse.Namespace, storage_options: dict) -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    if args.train_data_meta_dir:
        tasks.update(discover_tasks(args.train_data_meta_dir, storage_options))
    for name, patterns in parse_shard_flags(args.train_shards).items():
        tasks[name] = task_from_patterns(name, patterns, storage_options)
    if not tasks:
        raise DataConfigError("give --train_data_meta_dir or --train_shards")
    return tasks


def build_dataset(args: argparse.Namespace, rank: int, world: int) -> MixedBatchDataset:
    storage_options = parse_storage_options(args.storage_options)
    tasks = load_tasks(args, storage_options)
    if args.train_data_weights:
        task_weights = parse_weights(args.train_data_weights, "--train_data_weights")
    else:
        task_weights = {name: 1.0 for name in tasks}
    n_weights = parse_weights(args.train_src_img_num_weights, "--train_src_img_num_weights")
    plan = plan_mix(tasks, task_weights, n_weights)
    if rank == 0:
        log.info("mix: N %s; tasks per N %s", plan.n_probs, plan.task_probs)
    config = StreamConfig(
        batch_size=args.train_batch_size,
        seed=args.seed,
        shuffle_buffer=args.shuffle_buffer,
        image_sample_size=args.image_sample_size,
        enable_inverse=args.enable_inverse,
        text_drop_ratio=args.text_drop_ratio,
        storage_options=storage_options,
        online_prompts=getattr(args, "condition_encoder_mode", "offline") == "sync",
    )
    return MixedBatchDataset(tasks, plan, rank, world, config)


def build_loader(dataset: MixedBatchDataset, args: argparse.Namespace):
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(
        dataset,
        batch_size=None,
        num_workers=args.dataloader_num_workers,
        prefetch_factor=args.prefetch_factor if args.dataloader_num_workers else None,
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


def data_state_file(rank: int) -> str:
    return f"data_state_rank{rank}.json"


def load_data_state(checkpoint: Path, rank: int) -> dict[str, Any]:
    return json.loads((checkpoint / data_state_file(rank)).read_text())


def json_state(state: Any) -> Any:
    """StatefulDataLoader state as plain JSON (a round trip checks nothing un-JSON-able slipped in)."""
    return json.loads(json.dumps(state))


def distributed_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_data_only(args: argparse.Namespace) -> int:
    """The real loader without a model: trace, checkpoints of the data state, exact resume."""
    from pipeline import checkpoint as ckpt

    rank, world = distributed_env()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")

    def barrier() -> None:
        if world > 1:
            torch.distributed.barrier()

    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(args, rank, world)
    loader = build_loader(dataset, args)
    start = 0
    resume = ckpt.resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        state = load_data_state(resume, rank)
        loader.load_state_dict(state["loader"])
        start = state["step"]
        log.info("resuming data at step %d from %s", start, resume)
    trace = TraceWriter(args.data_trace)
    started, waited, batches = time.perf_counter(), 0.0, iter(loader)
    try:
        for step in range(start, args.max_train_steps):
            batch, wait = next_batch(batches, step)
            waited += wait
            trace.write(step + 1, batch)
            done = step + 1
            if done % args.checkpointing_steps == 0 or done == args.max_train_steps:
                state = {"step": done, "loader": json_state(loader.state_dict())}

                def write_rank_files(folder: Path, state=state) -> None:
                    ckpt.write_json_file(folder / data_state_file(rank), state)

                ckpt.save_checkpoint(
                    args.output_dir,
                    done,
                    rank,
                    barrier,
                    write_rank_files,
                    {"data_only": True, "world_size": world},
                    args.checkpoints_total_limit,
                )
    finally:
        trace.close()
    elapsed = time.perf_counter() - started
    steps = args.max_train_steps - start
    log.info(
        "%d steps in %.1fs (%.2f steps/s), waiting for data %.1fs", steps, elapsed, steps / max(elapsed, 1e-9), waited
    )
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.data_only:
            return run_data_only(args)
        if not args.pretrained_model_name_or_path:
            raise DataConfigError("--pretrained_model_name_or_path is required (or --data_only)")
        from pipeline.trainer import Trainer

        trainer = Trainer(args)
        trainer.setup()
        if args.export_checkpoint:
            trainer.load(Path(args.export_checkpoint))
            if trainer.accelerator.is_main_process:
                log.info("exported %s", trainer.export(args.output_dir))
            return 0
        result = trainer.train()
        if trainer.accelerator.is_main_process:
            log.info(
                "final loss %.4f; outputs %s",
                result["losses"][-1] if result["losses"] else float("nan"),
                result["outputs"],
            )
        return 0
    except (DataConfigError, ValueError, FileNotFoundError) as exc:  # errors in what the user gave us
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
