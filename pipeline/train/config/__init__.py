"""Typed training configuration: one dataclass per component, built once from the command line and checked here.

The components live by section: ``data`` (tasks, mixing, the stream), ``model``
(model, LoRA, loss, optimiser), ``run`` (folder, checkpoints, tracking, validation,
one invocation's flags); this module composes them into :class:`TrainConfig`.

Each option is a field of one of these classes (``option(...)``, see
``pipeline/common/options.py``): the CLI's parser is derived from them and
:func:`config_from_args` builds them back from the parsed flags.  Everything below
the CLI — the stream, the flow-matching loss, the loop, the checkpointer — takes
these configs, never the Namespace, so each component states what it reads.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.common.flags import MAX_DDP_TIMEOUT, TRAIN_DDP_TIMEOUT, ddp_timeout_help
from pipeline.common.options import (
    INVOCATION,
    Checked,
    at_least,
    between,
    from_flags,
    option,
)
from pipeline.common.process_group import distributed_env
from pipeline.errors import UserError
from pipeline.shards.storage import has_scheme
from pipeline.shards.tasks import DataConfigError
from pipeline.train.config.data import DataConfig, StreamConfig
from pipeline.train.config.model import FlowConfig, LoraConfig, ModelConfig, OptimConfig
from pipeline.train.config.run import (
    CheckpointConfig,
    CompatOptions,
    PlanOptions,
    RunOptions,
    TrackingConfig,
    ValidationConfig,
)


@dataclass(frozen=True)
class TrainConfig(Checked):
    data: DataConfig
    stream: StreamConfig
    checkpoint: CheckpointConfig
    max_train_steps: int | None = option(
        None, "optimizer steps to run (required unless --plan)", scope=INVOCATION, check=at_least(1)
    )
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: ModelConfig | None = None  # None: --data_only
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    validation: ValidationConfig | None = None  # None: no --validation_jsonl
    export_checkpoint: str | None = option(None, "export this checkpoint for diffusers and exit", scope=INVOCATION)
    parallelism: str = option(
        "auto",
        "fsdp: shard the transformer blocks with PyTorch FSDP2 (fp32 master weights, compute in the mixed "
        "precision dtype, sharded checkpoints); ddp: replicate it. auto: fsdp when accelerate launch runs an FSDP "
        "configuration (e.g. examples/accelerate_fsdp.yaml), else ddp",
        choices=("auto", "ddp", "fsdp"),
        const_aliases=(("use_fsdp", "fsdp"),),
    )
    fsdp_cpu_offload: bool = option(
        False,
        "FSDP only: keep the sharded parameters, their gradients and the optimizer states in host memory "
        "(FSDP2's CPUOffloadPolicy; the optimizer steps on the CPU); a GPU then holds the gathered blocks and the "
        "activations. For full fine-tuning on fewer or smaller GPUs, and LoRA on one GPU (--parallelism fsdp over 1)",
    )
    ddp_timeout: int = option(
        TRAIN_DDP_TIMEOUT,
        ddp_timeout_help(TRAIN_DDP_TIMEOUT, "30 minutes, several times the longest wait at 20B (an export)"),
        scope=INVOCATION,
        check=between(1, MAX_DDP_TIMEOUT),
    )
    recipe: dict[str, Any] = field(default_factory=dict)  # every flag, resolved (output_dir/config.yaml)
    allow_recipe_change: bool = False  # resume even when the model settings differ from config.yaml

    def __post_init__(self) -> None:
        """The checks across components: what would otherwise fail at the first step, or silently."""
        super().__post_init__()
        if self.fsdp_cpu_offload and not self.fsdp:
            raise UserError("--fsdp_cpu_offload offloads FSDP's shards: add --parallelism fsdp (on one GPU too)")
        lora = self.model.lora if self.model else None
        if self.fsdp and lora is not None and lora.base_weight_dtype != "auto":
            raise UserError(  # FSDP's param dtype would cast the fp8 weights to bf16 without their scales
                "--base_weight_dtype float8_e4m3fn works with DDP or one process, not FSDP (each GPU holds the fp8 "
                "base whole, ~20 GB for the 20B DiT)"
            )
        if self.optim.use_8bit_adam:
            check_8bit_adam(self.fsdp)

    @property
    def fsdp(self) -> bool:
        return use_fsdp(self.parallelism)

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


def use_fsdp(parallelism: str) -> bool:
    """``--parallelism fsdp``, or ``auto`` under an accelerate FSDP launch (``--use_fsdp``, or a config file with
    ``distributed_type: FSDP``: both reach the processes as ``ACCELERATE_USE_FSDP``), on GPUs or CPUs."""
    if parallelism == "auto":
        return distributed_env().fsdp_requested
    return parallelism == "fsdp"


def check_8bit_adam(fsdp: bool) -> None:
    """Refuse at start-up what would fail at the first step: bitsandbytes missing, or its kernels under FSDP2."""
    if fsdp:
        raise UserError(
            "--use_8bit_adam works with DDP or one process: bitsandbytes' update kernels take no FSDP2 sharded "
            "(DTensor) parameters; drop --parallelism fsdp, or use AdamW (whose states FSDP shards instead)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--use_8bit_adam needs bitsandbytes: pip install 'qwen-edit-shards[adam8bit]'") from None


# (argparse group title, the classes whose options it shows), in --help order
OPTION_GROUPS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("data", (DataConfig, StreamConfig)),
    ("run", (CheckpointConfig, RunOptions)),
    ("model", (ModelConfig, LoraConfig)),
    ("optimisation", (OptimConfig, FlowConfig, TrainConfig)),
    ("tracking", (TrackingConfig,)),
    ("validation images", (ValidationConfig,)),
    ("memory plan (--plan: nothing is loaded, nothing allocated)", (PlanOptions,)),
    ("accepted for the original tool's command lines (the launcher decides these)", (CompatOptions,)),
)
OPTION_CLASSES = tuple(cls for _, classes in OPTION_GROUPS for cls in classes)


def recipe_of(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag's resolved value, as plain YAML-able data (``output_dir/config.yaml``)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())}


def resolve_model_defaults(args: argparse.Namespace) -> None:
    """Defaults that depend on the model's family, filled into the flags (so ``config.yaml`` records the values the
    run used): the LoRA targets. Nothing without a model."""
    from pipeline import families

    if args.pretrained_model_name_or_path and not args.data_only and args.lora_target_modules is None:
        try:
            family = families.detect(args.pretrained_model_name_or_path)
        except UserError:  # not a model folder here (a Hub id, a typo): the model's loading says so, or fills them
            return
        args.lora_target_modules = ",".join(family.default_lora_targets)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The one place where flags become configs; each config checks its own fields and those across them."""
    for flag in ("output_dir", "max_train_steps"):
        if getattr(args, flag) is None:
            raise UserError(f"--{flag} is required")
    if not args.train_data_meta_dir and not args.train_shards:
        raise DataConfigError("give --train_data_meta_dir or --train_shards")
    if not args.data_only and not args.pretrained_model_name_or_path:
        raise DataConfigError("--pretrained_model_name_or_path is required (or --data_only)")
    if has_scheme(args.output_dir):
        raise UserError(
            f"--output_dir {args.output_dir}: checkpoints and exports are written with local file operations "
            "(atomic renames); give a local or mounted folder (for object storage, mount it or copy afterwards)"
        )
    resolve_model_defaults(args)
    validation = None
    if args.validation_jsonl:
        validation = from_flags(ValidationConfig, args, seed=args.seed)
    model = None
    if args.pretrained_model_name_or_path and not args.data_only:
        lora = None
        if args.use_peft_lora:
            lora = from_flags(LoraConfig, args)
        elif args.base_weight_dtype != "auto":
            raise UserError("--base_weight_dtype float8_e4m3fn stores a frozen base: it needs --use_peft_lora")
        model = from_flags(ModelConfig, args, lora=lora)
    return from_flags(
        TrainConfig,
        args,
        data=from_flags(DataConfig, args),
        stream=from_flags(StreamConfig, args, online_prompts=args.condition_encoder_mode == "sync"),
        checkpoint=from_flags(CheckpointConfig, args),
        flow=from_flags(FlowConfig, args, seed=args.seed),
        optim=from_flags(OptimConfig, args),
        model=model,
        tracking=from_flags(TrackingConfig, args),
        validation=validation,
        recipe=recipe_of(args),
        allow_recipe_change=args.allow_recipe_change,
    )
