"""``python -m pipeline.train``: flags → :class:`TrainConfig` → the loop (or, with ``--data_only``, the loader alone).

Data path: tasks (``shards.tasks``) → per-(task, N) partitions and mixing
(``stream``) → batches (``batching``) → torchdata's ``StatefulDataLoader``
(``data``), whose JSON state goes into every checkpoint (``checkpoint``); the
loop (``loop``) turns batches into the flow-matching loss (``flow``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.common.flags import add_prompt_style, add_storage_options
from pipeline.common.logs import setup_logging
from pipeline.shards.tasks import DataConfigError
from pipeline.train.checkpoint import CheckpointDamaged, damage_of
from pipeline.train.config import config_from_args
from pipeline.train.fp8 import FP8_DTYPES
from pipeline.train.loop import NonFiniteTraining, Trainer, run_data_only
from pipeline.train.model import DEFAULT_LORA_TARGETS
from pipeline.train.recipe import parse_with_recipe

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
        default="0=0,1=10,2=0,3=0",
        help='weight per number of source images, "0=1,1=1,2=1,3=0"; drawn per step, the same on every rank '
        "(default: the original tool's, single-source edits only)",
    )
    g.add_argument(
        "--allow_mixed_conditioning",
        action="store_true",
        help="train on tasks whose manifests disagree on prompt style or encoder (config digest); refused "
        "by default. Different embedding hidden sizes are always refused",
    )
    g.add_argument("--train_batch_size", type=int, default=16, help="samples per batch and rank")
    g.add_argument("--image_sample_size", type=int, default=512, help="crop area ≈ this squared (sides /32)")
    g.add_argument("--enable_inverse", action="store_true", help="also train on inverse instructions (swap roles)")
    g.add_argument("--text_drop_ratio", type=float, default=0.05, help="probability of the empty-text embedding")
    g.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="DataLoader workers per rank (0: the main process)"
    )
    g.add_argument("--prefetch_factor", type=int, default=2, help="batches each worker prepares ahead")
    g.add_argument(
        "--shuffle_buffer",
        type=int,
        default=64,
        help="streamed shards only (pipe:, no index): samples in each stream's shuffle buffer; indexed shards follow "
        "a computed sample-level order and need none",
    )
    g.add_argument(
        "--pool_mb",
        type=float,
        default=128,
        help="MiB of samples a DataLoader worker keeps waiting in aspect-bucket pools and shuffle buffers, over all "
        "streams; past it batches are made from similar buckets",
    )
    g.add_argument(
        "--readahead_mb",
        type=float,
        default=64,
        help="MiB of range reads a DataLoader worker keeps in flight for the samples it needs next (indexed shards, "
        "8 threads); 0 reads one sample after another",
    )
    g.add_argument("--seed", type=int, default=42, help="seed of every data, noise and validation draw")
    add_storage_options(g)
    g.add_argument(
        "--data_trace",
        default=None,
        help="append one JSON line per step and rank (task, N, bucket, keys, variants, texts) to this file",
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="model-finetuned", help="checkpoints, logs, validation images, exports")
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps to run (required unless --plan)")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a checkpoint every this many steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='"latest" (newest complete checkpoint), a checkpoint folder, or its name in --output_dir (checkpoint-500)',
    )
    g.add_argument("--data_only", action="store_true", help="run the real data loader without a model")
    g.add_argument(
        "--allow_recipe_change",
        action="store_true",
        help="resume even though the model settings differ from the run's output_dir/config.yaml (reported anyway)",
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None, help="Qwen-Image-Edit(-2509) diffusers folder")
    g.add_argument(
        "--transformer_path",
        default=None,
        help="a diffusers transformer folder to load instead, or one .safetensors (or weights-only .pt) state dict "
        "loaded into the base transformer",
    )
    g.add_argument("--vae_path", default=None, help="the same for the VAE: a diffusers folder or one state-dict file")
    g.add_argument(
        "--trainable_modules",
        nargs="+",
        default=["."],
        help='full fine-tuning: parameter-name substrings that train ("." = all); several, space or comma separated',
    )
    g.add_argument(
        "--trainable_modules_low_learning_rate",
        nargs="+",
        default=[],
        help="substrings of parameters trained at half the LR",
    )
    g.add_argument("--use_peft_lora", action="store_true", help="train a LoRA adapter instead of full weights")
    g.add_argument("--lora_r", "--lora_rank", dest="lora_r", type=int, default=32, help="LoRA rank")
    g.add_argument("--lora_alpha", type=float, default=32.0, help="LoRA alpha (the update is scaled by alpha / rank)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout")
    g.add_argument("--lora_target_modules", default=DEFAULT_LORA_TARGETS, help="comma-separated LoRA target modules")
    g.add_argument("--lora_path", default=None, help="initialise the LoRA from this safetensors file")
    g.add_argument(
        "--base_weight_dtype",
        choices=["auto", *FP8_DTYPES],
        default="auto",
        help="LoRA only: how the frozen transformer blocks' Linear weights are stored. auto (default): the compute "
        "dtype (bf16: ~41 GB for the 20B DiT); float8_e4m3fn: fp8 with one scale per output channel, computed in "
        "bf16 (~20 GB); DDP or one process, not FSDP",
    )
    g.add_argument(
        "--lora_export_format",
        choices=["diffusers", "comfyui", "both"],
        default="diffusers",
        help="LoRA files written into every checkpoint and at the end: diffusers (pytorch_lora_weights.safetensors, "
        "alpha in its metadata, for load_lora_weights), comfyui (qwen_image_edit_lora_comfyui.safetensors: "
        "diffusion_model.* keys with .alpha tensors), or both",
    )
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--vae_mini_batch", type=int, default=32, help="images per VAE encode call")
    g.add_argument(
        "--condition_encoder_mode",
        choices=["offline", "sync"],
        default="offline",
        help="offline: embeddings from the shards; sync: encode prompts during training from the shard's images "
        "and text with the extraction code (for shards made with --skip_embeddings)",
    )
    g.add_argument(
        "--sync_text_encoder",
        dest="condition_encoder_mode",
        action="store_const",
        const="sync",
        help="the original tool's name for --condition_encoder_mode sync",
    )
    add_prompt_style(g, when="sync mode only. ")

    o = p.add_argument_group("optimisation")
    o.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate")
    o.add_argument("--scale_lr", action="store_true", help="multiply the LR by accumulation × batch × processes")
    o.add_argument("--lr_scheduler", default="constant", help="diffusers get_scheduler name (constant_with_warmup …)")
    o.add_argument("--lr_warmup_steps", type=int, default=500, help="warm-up steps (of *_with_warmup schedulers)")
    o.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    o.add_argument(
        "--num_train_epochs",
        type=int,
        default=1,
        help="accepted for compatibility and ignored: the stream is endless and --max_train_steps decides the length",
    )
    o.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    o.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    o.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    o.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    o.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (must be installed)")
    o.add_argument("--use_came", action="store_true", help="CAME optimizer (came-pytorch must be installed)")
    o.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    o.add_argument(
        "--initial_grad_norm_ratio",
        type=float,
        default=5,
        help="the clipping threshold starts at this × --max_grad_norm and falls linearly to --max_grad_norm at step "
        "--abnormal_norm_clip_start",
    )
    o.add_argument(
        "--abnormal_norm_clip_start",
        type=int,
        default=1000,
        help="after this step, a norm above 5× the threshold is clipped to threshold / min(norm / threshold, 10)",
    )
    o.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="compute precision; default: what accelerate launch / its config file says (else no). LoRA loads the "
        "frozen transformer and the VAE in this dtype; full fine-tuning keeps fp32 master weights",
    )
    o.add_argument("--allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere+ GPUs (faster fp32 parts)")
    o.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=5,
        help="a step whose gradient norm is NaN/Inf is skipped; this many in a row stop the run",
    )
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
    o.add_argument(
        "--parallelism",
        choices=["auto", "ddp", "fsdp"],
        default="auto",
        help="fsdp: shard the transformer blocks with PyTorch FSDP2 (fp32 master weights, compute in the mixed "
        "precision dtype, sharded checkpoints); ddp: replicate it. auto: fsdp when accelerate launch runs an FSDP "
        "configuration (e.g. examples/accelerate_fsdp.yaml), else ddp",
    )
    o.add_argument("--use_fsdp", dest="parallelism", action="store_const", const="fsdp", help="= --parallelism fsdp")
    o.add_argument(
        "--fsdp_cpu_offload",
        action="store_true",
        help="FSDP only: keep the sharded parameters, their gradients and the optimizer states in host memory "
        "(FSDP2's CPUOffloadPolicy; the optimizer steps on the CPU); a GPU then holds the gathered blocks and the "
        "activations. For full fine-tuning on fewer or smaller GPUs, and LoRA on one GPU (--parallelism fsdp over 1)",
    )
    o.add_argument("--export_checkpoint", default=None, help="export this checkpoint for diffusers and exit")


def add_tracking_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tracking")
    g.add_argument(
        "--report_to",
        default="auto",
        help="tensorboard, wandb, all, or none; auto (default): wandb when it is installed, else tensorboard",
    )
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    g.add_argument("--tracker_project_name", default="rededit-finetune", help="project name given to the trackers")
    g.add_argument(
        "--report_model_info",
        action="store_true",
        help="also log the gradient norm of each parameter group (transformer_blocks.N, img_in, …) before clipping",
    )


def add_validation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation images")
    g.add_argument(
        "--validation_jsonl",
        default=None,
        help="rows like the extraction input (0-3 source_image, instruction): rendered with the current weights "
        "every --validation_steps steps and at the end, into output_dir/validation/step-XXXXXX/ and the trackers",
    )
    g.add_argument("--validation_steps", type=int, default=500, help="render the validation rows every N steps")
    g.add_argument("--validation_inference_steps", type=int, default=20, help="denoising steps per validation image")
    g.add_argument(
        "--validation_guidance_scale",
        type=float,
        default=4.0,
        help="true classifier-free guidance scale (negative prompt: a blank); <= 1 turns guidance off",
    )
    g.add_argument(
        "--caption_font",
        default=None,
        help="TrueType/OpenType font for contact-sheet captions (default: the first font found that has CJK glyphs)",
    )


def add_compat_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("accepted for the original tool's command lines (the launcher decides these)")
    g.add_argument("--local_rank", type=int, default=-1, help="ignored: the rank comes from the launcher")
    g.add_argument("--nnodes", type=int, default=1, help="ignored: the launcher sets the machines")
    g.add_argument("--num_processes_per_node", type=int, default=1, help="ignored: the launcher sets the processes")
    g.add_argument("--streaming", action="store_true", help="ignored: shards are always streamed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train a Qwen-Image-Edit transformer on WebDataset shards mixed by task and source count.",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="RECIPE.yaml",
        help="a YAML recipe of flags (flag names without dashes); flags on the command line override it",
    )
    add_data_arguments(p)
    add_run_arguments(p)
    add_model_arguments(p)
    add_tracking_arguments(p)
    add_validation_arguments(p)
    add_plan_arguments(p)
    add_compat_arguments(p)
    return p


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory plan (--plan: nothing is loaded, nothing allocated)")
    g.add_argument(
        "--plan",
        action="store_true",
        help="print the memory each GPU needs for this mode and exit; the model is built on the meta device from "
        "--pretrained_model_name_or_path's config.json, or give that flag the name qwen-image-edit-2509",
    )
    g.add_argument("--plan_gpu_memory", type=float, default=80.0, help="GiB per GPU to check the plan against")
    g.add_argument(
        "--plan_processes", type=int, default=None, help="processes (GPUs) of the run (default: WORLD_SIZE or 1)"
    )
    g.add_argument("--plan_num_sources", type=int, default=1, help="source images per sample to plan for")
    g.add_argument("--plan_text_tokens", type=int, default=512, help="prompt embedding length to plan for")


def print_plan(args: argparse.Namespace) -> int:
    from pipeline.common.flags import distributed_env
    from pipeline.train.config import split_patterns
    from pipeline.train.plan import (
        PlanRequest,
        build_on_meta,
        card_table,
        format_card_table,
        format_plan,
        memory_plan,
        read_configs,
    )

    if not args.pretrained_model_name_or_path:
        raise ValueError("--plan needs --pretrained_model_name_or_path (a folder, or qwen-image-edit-2509)")
    env = distributed_env()
    request = PlanRequest(
        lora=args.use_peft_lora,
        lora_rank=args.lora_r,
        lora_targets=tuple(split_patterns(args.lora_target_modules)),
        trainable_modules=tuple(split_patterns(args.trainable_modules)),
        fsdp=args.parallelism == "fsdp" or (args.parallelism == "auto" and env.fsdp_requested),
        processes=args.plan_processes or env.world,
        mixed_precision=args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
        gradient_checkpointing=args.gradient_checkpointing,
        batch_size=args.train_batch_size,
        image_sample_size=args.image_sample_size,
        num_sources=args.plan_num_sources,
        text_tokens=args.plan_text_tokens,
        optimizer_bytes_per_param=2 if args.use_8bit_adam else 8,
        gpu_memory_gib=args.plan_gpu_memory,
        lora_dropout=args.lora_dropout,
        vae_mini_batch=args.vae_mini_batch,
        base_weight_dtype=args.base_weight_dtype,
        cpu_offload=args.fsdp_cpu_offload,
        validation=bool(args.validation_jsonl),
    )
    transformer, vae = build_on_meta(*read_configs(args.pretrained_model_name_or_path))
    print(format_plan(memory_plan(transformer, vae, request)))
    gpus = max(request.processes, 8)
    print("\nwhich card: this run's batch, size, sources and text in every mode (planned, not measured on a GPU)")
    print(format_card_table(card_table(transformer, vae, request, gpus)))
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        args = parse_with_recipe(build_parser(), sys.argv[1:] if argv is None else list(argv))
        if args.plan:
            return print_plan(args)
        config = config_from_args(args)
        if config.model is None:
            return run_data_only(config)
        trainer = Trainer(config)
        trainer.setup()
        if config.export_checkpoint:
            folder = Path(config.export_checkpoint)
            problem = damage_of(folder, trainer.rank, trainer.world, trainer.accelerator.device)
            if problem:
                raise CheckpointDamaged(f"{folder} is damaged: {problem}")
            trainer.load(folder)
            outputs = trainer.export(config.output_dir)  # collective under FSDP
            if trainer.accelerator.is_main_process:
                log.info("exported %s", outputs)
            return 0
        result = trainer.train()
        if trainer.accelerator.is_main_process:  # what the run measured, for scripts (benchmarks/gpu_check.py)
            summary = {k: v for k, v in result.items() if k != "losses"} | {"final_loss": result["losses"][-1:]}
            (Path(config.output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=1))
            log.info(
                "final loss %.4f; outputs %s",
                result["losses"][-1] if result["losses"] else float("nan"),
                result["outputs"],
            )
        return 0
    except NonFiniteTraining as exc:
        log.error("%s", exc)
        return 1
    except (DataConfigError, ValueError, FileNotFoundError) as exc:  # errors in what the user gave us
        log.error("%s", exc)
        return 2
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Tear the process group down on the way out: a gloo rank whose peer exited first aborts in its teardown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
