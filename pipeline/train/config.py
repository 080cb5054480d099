"""Typed training configuration: one dataclass per component, built once from the command line and checked here.

The CLI (``pipeline.train.cli``) parses flags into an ``argparse.Namespace``;
:func:`config_from_args` turns it into a :class:`TrainConfig`.  Everything below
the CLI — the stream, the flow-matching loss, the loop, the checkpointer — takes
these configs, never the Namespace, so each component states what it reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.shards.storage import has_scheme, parse_storage_options
from pipeline.shards.tasks import DataConfigError


def parse_weights(text: str, flag: str) -> dict[str, float]:
    """``"a=0.5,b=1.2"`` → ``{"a": 0.5, "b": 1.2}``; clear errors naming the flag."""
    weights: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{flag}: expected NAME=WEIGHT, got {item!r}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"{flag}: weight of {name!r} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:  # inf would make every probability NaN
            raise ValueError(f"{flag}: the weight of {name!r} must be a finite number >= 0, got {value!r}")
        if name in weights:
            raise ValueError(f"{flag}: {name!r} is listed twice")
        weights[name] = weight
    if not weights:
        raise ValueError(f"{flag}: no weights given")
    return weights


def parse_shard_flags(values: list[str]) -> dict[str, list[str]]:
    """``--train_shards task=PATTERN`` (repeatable) → task → patterns."""
    out: dict[str, list[str]] = {}
    for value in values:
        name, sep, pattern = value.partition("=")
        if not sep or not name.strip() or not pattern.strip():
            raise DataConfigError(f"--train_shards expects TASK=URL_PATTERN, got {value!r}")
        out.setdefault(name.strip(), []).append(pattern.strip())
    return out


def split_patterns(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"a,b c"`` or ``["a,b", "c"]`` (``nargs="+"`` flags) → ``["a", "b", "c"]``."""
    if isinstance(text, list | tuple):
        text = " ".join(text)
    return [p for p in (text or "").replace(",", " ").split() if p]


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Which tasks to read and how they are mixed."""

    meta_dir: str | None = None
    shard_patterns: dict[str, list[str]] = field(default_factory=dict)  # task -> URL patterns
    task_weights: dict[str, float] | None = None  # None: every task, weight 1
    source_count_weights: dict[str, float] = field(default_factory=lambda: {"0": 0.0, "1": 10.0, "2": 0.0, "3": 0.0})
    num_workers: int = 0
    prefetch_factor: int = 2
    trace_path: str | None = None  # one JSON line per step and rank
    allow_mixed_conditioning: bool = False  # tasks may differ in prompt style / encoder


@dataclass(frozen=True)
class StreamConfig:
    """What the per-rank batch stream needs."""

    batch_size: int
    seed: int = 42
    shuffle_buffer: int = 64
    image_sample_size: int = 512
    enable_inverse: bool = False
    text_drop_ratio: float = 0.05
    storage_options: dict | None = None
    online_prompts: bool = False  # --condition_encoder_mode sync: batches carry images + text, not embeddings
    pool_bytes: int = 128 << 20  # samples waiting in bucket pools and shuffle buffers, per DataLoader worker
    readahead_bytes: int = 64 << 20  # range reads in flight per DataLoader worker (0: read one after another)


@dataclass(frozen=True)
class FlowConfig:
    """Flow-matching loss: timestep sampling, loss weighting, VAE batching."""

    seed: int = 42
    sampling_steps: int = 1000
    uniform_sampling: bool = False
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    vae_mini_batch: int = 1


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, schedule and gradient clipping; defaults are the original tool's."""

    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    gradient_accumulation_steps: int = 1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    use_came: bool = False
    max_grad_norm: float = 1.0
    initial_grad_norm_ratio: float = 5.0  # the clip threshold starts at this × max_grad_norm ...
    abnormal_norm_clip_start: int = 1000  # ... reaches max_grad_norm here; abnormal norms are damped after it
    mixed_precision: str | None = None  # None: accelerate's launch configuration decides
    allow_tf32: bool = False
    max_nonfinite_steps: int = 5


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 32
    alpha: float = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    init_path: str | None = None  # start from this safetensors file
    export_format: str = "diffusers"  # diffusers | comfyui | both
    base_weight_dtype: str = "auto"  # auto: the compute dtype; float8_e4m3fn: the frozen base stored in fp8


@dataclass(frozen=True)
class ModelConfig:
    pretrained: str
    transformer_path: str | None = None
    vae_path: str | None = None
    trainable_modules: tuple[str, ...] = (".",)
    low_lr_modules: tuple[str, ...] = ()
    lora: LoraConfig | None = None  # None: full fine-tuning
    gradient_checkpointing: bool = False
    condition_encoder_mode: str = "offline"
    prompt_style: str = "diffusers"


@dataclass(frozen=True)
class CheckpointConfig:
    output_dir: str
    every: int = 500
    total_limit: int | None = None
    resume_from: str | None = None  # "latest", a checkpoint folder, or a checkpoint's name inside output_dir


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (accelerate trackers) and what is logged."""

    report_to: str = "tensorboard"  # resolved: tensorboard | wandb | all | none | a comma list
    logging_dir: str = "logs"  # relative to output_dir (as the original tool)
    project_name: str = "rededit-finetune"
    report_model_info: bool = False  # gradient norm of each parameter group, before clipping
    loss_window: int = 50  # running means of the loss per task and per N over this many batches


@dataclass(frozen=True)
class ValidationConfig:
    """Images rendered with the current weights every ``steps`` optimizer steps and at the end."""

    jsonl: str
    steps: int = 500
    inference_steps: int = 20
    guidance_scale: float = 4.0
    seed: int = 0
    caption_font: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig
    stream: StreamConfig
    checkpoint: CheckpointConfig
    max_train_steps: int
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: ModelConfig | None = None  # None: --data_only
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    validation: ValidationConfig | None = None  # None: no --validation_jsonl
    export_checkpoint: str | None = None
    parallelism: str = "auto"  # auto | ddp | fsdp
    fsdp_cpu_offload: bool = False  # FSDP2's CPUOffloadPolicy: sharded parameters, gradients and optimizer on the host
    recipe: dict[str, Any] = field(default_factory=dict)  # every flag, resolved (output_dir/config.yaml)
    allow_recipe_change: bool = False  # resume even when the model settings differ from config.yaml

    @property
    def output_dir(self) -> str:
        return self.checkpoint.output_dir

    def scalars(self) -> dict[str, Any]:
        """Flat ``component.field`` → value of every scalar setting (for experiment trackers)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if dataclasses.is_dataclass(value):
                for f in dataclasses.fields(value):
                    walk(f"{prefix}{f.name}.", getattr(value, f.name))
            elif isinstance(value, int | float | str | bool):
                out[prefix.rstrip(".")] = value

        walk("", self)
        return out


def resolve_report_to(value: str) -> str:
    """``auto`` (the default) → wandb when the package is installed, else tensorboard (the original's default
    is wandb, which fails where it is not installed)."""
    if value != "auto":
        return value
    import importlib.util

    return "wandb" if importlib.util.find_spec("wandb") is not None else "tensorboard"


def recipe_of(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag's resolved value, as plain YAML-able data (``output_dir/config.yaml``)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())}


def _positive(name: str, value: int | float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _from_flags(cls, args: argparse.Namespace, **flag_of: str):
    """A config whose fields are named like their flags (``flag_of`` names the exceptions)."""
    return cls(**{f.name: getattr(args, flag_of.get(f.name, f.name)) for f in dataclasses.fields(cls)})


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The one place where flags become configs and are checked against each other."""
    for flag in ("output_dir", "max_train_steps"):
        if getattr(args, flag) is None:
            raise ValueError(f"--{flag} is required")
    _positive("--max_train_steps", args.max_train_steps)
    _positive("--train_batch_size", args.train_batch_size)
    _positive("--checkpointing_steps", args.checkpointing_steps)
    _positive("--gradient_accumulation_steps", args.gradient_accumulation_steps)
    _positive("--dataloader_num_workers", args.dataloader_num_workers, allow_zero=True)
    if not 0.0 <= args.text_drop_ratio <= 1.0:
        raise ValueError(f"--text_drop_ratio must be in [0, 1], got {args.text_drop_ratio}")
    if not args.train_data_meta_dir and not args.train_shards:
        raise DataConfigError("give --train_data_meta_dir or --train_shards")
    if not args.data_only and not args.pretrained_model_name_or_path:
        raise DataConfigError("--pretrained_model_name_or_path is required (or --data_only)")
    if has_scheme(args.output_dir):
        raise ValueError(
            f"--output_dir {args.output_dir}: checkpoints and exports are written with local file operations "
            "(atomic renames); give a local or mounted folder (for object storage, mount it or copy afterwards)"
        )
    shard_patterns = parse_shard_flags(args.train_shards)
    data_url = args.train_data_meta_dir or next((p[0] for p in shard_patterns.values() if p), None)
    storage_options = parse_storage_options(args.storage_options, data_url)
    data = DataConfig(
        meta_dir=args.train_data_meta_dir,
        shard_patterns=shard_patterns,
        task_weights=parse_weights(args.train_data_weights, "--train_data_weights")
        if args.train_data_weights
        else None,
        source_count_weights=parse_weights(args.train_src_img_num_weights, "--train_src_img_num_weights"),
        num_workers=args.dataloader_num_workers,
        prefetch_factor=args.prefetch_factor,
        trace_path=args.data_trace,
        allow_mixed_conditioning=args.allow_mixed_conditioning,
    )
    stream = StreamConfig(
        batch_size=args.train_batch_size,
        seed=args.seed,
        shuffle_buffer=args.shuffle_buffer,
        image_sample_size=args.image_sample_size,
        enable_inverse=args.enable_inverse,
        text_drop_ratio=args.text_drop_ratio,
        storage_options=storage_options,
        online_prompts=args.condition_encoder_mode == "sync",
        pool_bytes=int(args.pool_mb * (1 << 20)),
        readahead_bytes=int(args.readahead_mb * (1 << 20)),
    )
    checkpoint = CheckpointConfig(
        output_dir=args.output_dir,
        every=args.checkpointing_steps,
        total_limit=args.checkpoints_total_limit,
        resume_from=args.resume_from_checkpoint,
    )
    flow = _from_flags(FlowConfig, args, sampling_steps="train_sampling_steps")
    optim = _from_flags(OptimConfig, args)
    validation = None
    if args.validation_jsonl:
        _positive("--validation_steps", args.validation_steps)
        _positive("--validation_inference_steps", args.validation_inference_steps)
        validation = ValidationConfig(
            jsonl=args.validation_jsonl,
            steps=args.validation_steps,
            inference_steps=args.validation_inference_steps,
            guidance_scale=args.validation_guidance_scale,
            seed=args.seed,
            caption_font=args.caption_font,
        )
    model = None
    if args.pretrained_model_name_or_path:
        lora = None
        if args.use_peft_lora:
            _positive("--lora_r", args.lora_r)
            lora = LoraConfig(
                rank=args.lora_r,
                alpha=args.lora_alpha,
                dropout=args.lora_dropout,
                target_modules=tuple(split_patterns(args.lora_target_modules)),
                init_path=args.lora_path,
                export_format=args.lora_export_format,
                base_weight_dtype=args.base_weight_dtype,
            )
        elif args.base_weight_dtype != "auto":
            raise ValueError("--base_weight_dtype float8_e4m3fn stores a frozen base: it needs --use_peft_lora")
        model = ModelConfig(
            pretrained=args.pretrained_model_name_or_path,
            transformer_path=args.transformer_path,
            vae_path=args.vae_path,
            trainable_modules=tuple(split_patterns(args.trainable_modules)),
            low_lr_modules=tuple(split_patterns(args.trainable_modules_low_learning_rate)),
            lora=lora,
            gradient_checkpointing=args.gradient_checkpointing,
            condition_encoder_mode=args.condition_encoder_mode,
            prompt_style=args.prompt_style,
        )
    return TrainConfig(
        data=data,
        stream=stream,
        checkpoint=checkpoint,
        max_train_steps=args.max_train_steps,
        flow=flow,
        optim=optim,
        model=None if args.data_only else model,
        tracking=TrackingConfig(
            report_to=resolve_report_to(args.report_to),
            logging_dir=args.logging_dir,
            project_name=args.tracker_project_name,
            report_model_info=args.report_model_info,
        ),
        validation=validation,
        export_checkpoint=args.export_checkpoint,
        parallelism=args.parallelism,
        fsdp_cpu_offload=args.fsdp_cpu_offload,
        recipe=recipe_of(args),
        allow_recipe_change=args.allow_recipe_change,
    )
