"""Typed training configuration: one dataclass per component, built once from the command line and checked here.

Each option is a field of one of these classes (``option(...)``, see
``pipeline/common/options.py``): the CLI's parser is derived from them and
:func:`config_from_args` builds them back from the parsed flags.  Everything below
the CLI — the stream, the flow-matching loss, the loop, the checkpointer — takes
these configs, never the Namespace, so each component states what it reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.common.flags import MAX_DDP_TIMEOUT, STORAGE_OPTIONS_HELP, TRAIN_DDP_TIMEOUT, ddp_timeout_help
from pipeline.common.options import (
    INVOCATION,
    MODEL,
    Checked,
    at_least,
    between,
    from_flags,
    greater_than,
    non_empty,
    option,
)
from pipeline.common.process_group import distributed_env
from pipeline.errors import UserError
from pipeline.families import FAMILIES, PROMPT_STYLES, prompt_style_help
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
            raise UserError(f"{flag}: expected NAME=WEIGHT, got {item!r}")
        try:
            weight = float(value)
        except ValueError:
            raise UserError(f"{flag}: weight of {name!r} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:  # inf would make every probability NaN
            raise UserError(f"{flag}: the weight of {name!r} must be a finite number >= 0, got {value!r}")
        if name in weights:
            raise UserError(f"{flag}: {name!r} is listed twice")
        weights[name] = weight
    if not weights:
        raise UserError(f"{flag}: no weights given")
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
# One dataclass per component.  A field declared with ``option(...)`` is also the command-line flag
# (pipeline/common/options.py): its help, default, aliases and resume scope are written here and nowhere else.

MIB = 1 << 20
# the crop's side: at the widest bucket (4:1) a side of S puts the long side at 2S, whose S/16 RoPE positions the
# text starts after (diffusers' scale_rope); 4096 leaves 3840 of the 4096 text positions, and is 4× the published
# training size (a larger number is a typo, and every prompt would be refused as too long)
MAX_IMAGE_SAMPLE_SIZE = 4096
# Adam's first step is lr / (1 - beta1) in float32 (max 3.4e38): far above any useful rate, far below an overflow
# (a traceback inside the optimizer) even after --scale_lr; a diverging rate below it ends as non-finite training
MAX_LEARNING_RATE = 1e6
FP8_FORMATS = ("float8_e4m3fn",)  # --base_weight_dtype choices besides auto (torch dtypes of these names)


def _mib(value: float, args=None) -> int:
    return int(value * MIB)


def _weights(flag: str):
    return lambda text, args=None: parse_weights(text, f"--{flag}") if text else None


def _patterns(value, args=None) -> tuple[str, ...]:
    return tuple(split_patterns(value))


def resolve_report_to(value: str) -> str:
    """``auto`` (the default) → wandb when the package is installed, else tensorboard (the original's default
    is wandb, which fails where it is not installed)."""
    if value != "auto":
        return value
    import importlib.util

    return "wandb" if importlib.util.find_spec("wandb") is not None else "tensorboard"


def _data_url(args: argparse.Namespace) -> str | None:
    """The URL the run reads (flat --storage_options apply to its protocol)."""
    patterns = parse_shard_flags(args.train_shards)
    return args.train_data_meta_dir or next((p[0] for p in patterns.values() if p), None)


@dataclass(frozen=True)
class DataConfig(Checked):
    """Which tasks to read and how they are mixed."""

    meta_dir: str | None = option(
        None,
        "folder or URL whose subfolders with a manifest.json are the tasks (listed once at start-up)",
        flag="train_data_meta_dir",
    )
    shard_patterns: dict[str, list[str]] = option(
        [],
        "explicit shards of a task, brace patterns allowed (repeatable); the source count comes from the "
        "src{N}/ folder; local, s3://, gs://, http(s):// and pipe: URLs",
        flag="train_shards",
        append=True,
        metavar="TASK=URL_PATTERN",
        convert=lambda values, args=None: parse_shard_flags(values),
    )
    task_weights: dict[str, float] | None = option(
        None,
        'sampling weight per task, "task_a=0.5,task_b=1.2"; tasks not listed are not used '
        "(default: every task, weight 1)",
        flag="train_data_weights",
        convert=_weights("train_data_weights"),
        weights=True,
    )
    source_count_weights: dict[str, float] = option(
        "0=0,1=10,2=0,3=0",
        'weight per number of source images, "0=1,1=1,2=1,3=0"; drawn per step, the same on every rank '
        "(default: the original tool's, single-source edits only)",
        flag="train_src_img_num_weights",
        convert=_weights("train_src_img_num_weights"),
        weights=True,
    )
    num_workers: int = option(
        0,
        "DataLoader workers per rank (0: the main process)",
        flag="dataloader_num_workers",
        check=at_least(0),
        aliases=("num_workers",),
        scope=INVOCATION,
    )
    prefetch_factor: int = option(2, "batches each worker prepares ahead", scope=INVOCATION, check=at_least(1))
    trace_path: str | None = option(
        None,
        "append one JSON line per step and rank (task, N, bucket, keys, variants, texts) to this file",
        flag="data_trace",
        scope=INVOCATION,
    )
    allow_mixed_conditioning: bool = option(
        False,
        "train on tasks whose manifests disagree on prompt style or encoder (config digest); refused "
        "by default. Different embedding hidden sizes are always refused",
    )


@dataclass(frozen=True)
class StreamConfig(Checked):
    """What the per-rank batch stream needs."""

    batch_size: int = option(16, "samples per batch and rank", flag="train_batch_size", check=at_least(1))
    seed: int = option(42, "seed of every data, noise and validation draw")
    shuffle_buffer: int = option(
        64,
        "streamed shards only (pipe:, no index): samples in each stream's shuffle buffer; indexed shards follow "
        "a computed sample-level order and need none",
        check=at_least(0),
    )
    image_sample_size: int = option(
        512, "crop area ≈ this squared (sides /32)", check=between(1, MAX_IMAGE_SAMPLE_SIZE)
    )
    enable_inverse: bool = option(False, "also train on inverse instructions (swap roles)")
    text_drop_ratio: float = option(0.05, "probability of the empty-text embedding", check=between(0, 1))
    storage_options: dict | None = option(
        None,
        STORAGE_OPTIONS_HELP,
        convert=lambda text, args=None: text if args is None else parse_storage_options(text, _data_url(args)),
    )
    online_prompts: bool = False  # --condition_encoder_mode sync: batches carry images + text, not embeddings
    pool_bytes: int = option(
        128,
        "MiB of samples a DataLoader worker keeps waiting in aspect-bucket pools and shuffle buffers, over all "
        "streams; past it batches are made from similar buckets",
        flag="pool_mb",
        flag_type=float,
        convert=_mib,
        check=at_least(0),
    )
    max_bad_in_a_row: int = option(
        1000,
        "a stream (task, source count) stops the run after this many unusable samples in a row (unreadable, corrupt "
        "or undecodable; each is skipped, counted and logged); an indexed task also stops after a whole failed pass",
        scope=INVOCATION,
        check=at_least(1),
    )
    readahead_bytes: int = option(
        64,
        "MiB of range reads a DataLoader worker keeps in flight for the samples it needs next (indexed shards, "
        "8 threads); 0 reads one sample after another",
        flag="readahead_mb",
        flag_type=float,
        convert=_mib,
        check=at_least(0),
    )


@dataclass(frozen=True)
class FlowConfig(Checked):
    """Flow-matching loss: timestep sampling, loss weighting, VAE batching."""

    seed: int = StreamConfig.seed  # the one --seed
    sampling_steps: int = option(1000, "T of the sigma schedule", flag="train_sampling_steps", check=at_least(1))
    uniform_sampling: bool = option(False, "timestep index range split evenly across ranks")
    weighting_scheme: str = option(
        "none",
        "timestep density and SD3 loss weighting",
        choices=("none", "logit_normal", "mode", "sigma_sqrt", "cosmap"),
    )
    logit_mean: float = option(0.0, "mean of logit_normal timestep sampling")
    logit_std: float = option(1.0, "std of logit_normal timestep sampling", check=greater_than(0))
    mode_scale: float = option(1.29, "scale of mode timestep sampling")
    vae_mini_batch: int = option(32, "images per VAE encode call", check=at_least(1))


@dataclass(frozen=True)
class OptimConfig(Checked):
    """Optimizer, schedule and gradient clipping; defaults are the original tool's."""

    learning_rate: float = option(1e-4, "peak learning rate", check=between(0, MAX_LEARNING_RATE))
    scale_lr: bool = option(False, "multiply the LR by accumulation × batch × processes")
    lr_scheduler: str = option("constant", "diffusers get_scheduler name (constant_with_warmup …)")
    lr_warmup_steps: int = option(500, "warm-up steps (of *_with_warmup schedulers)", check=at_least(0))
    gradient_accumulation_steps: int = option(1, "batches per optimizer step", check=at_least(1))
    adam_beta1: float = option(0.9, "AdamW beta1", check=between(0, 1, high_open=True))
    adam_beta2: float = option(0.999, "AdamW beta2", check=between(0, 1, high_open=True))
    adam_weight_decay: float = option(1e-2, "AdamW weight decay", check=at_least(0))
    adam_epsilon: float = option(1e-8, "AdamW epsilon", check=greater_than(0))
    use_8bit_adam: bool = option(False, "bitsandbytes AdamW8bit (must be installed)")
    use_came: bool = option(False, "CAME optimizer (came-pytorch must be installed)")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)", check=at_least(0))
    initial_grad_norm_ratio: float = option(
        5,
        "the clipping threshold starts at this × --max_grad_norm and falls linearly to --max_grad_norm at step "
        "--abnormal_norm_clip_start",
        check=at_least(1),
    )
    abnormal_norm_clip_start: int = option(
        1000,
        "after this step, a norm above 5× the threshold is clipped to threshold / min(norm / threshold, 10)",
        check=at_least(0),
    )
    mixed_precision: str | None = option(
        None,
        "compute precision; default: what accelerate launch / its config file says (else no). LoRA loads the "
        "frozen transformer and the VAE in this dtype; full fine-tuning keeps fp32 master weights",
        choices=("no", "fp16", "bf16"),
    )
    allow_tf32: bool = option(False, "allow TF32 matmuls on Ampere+ GPUs (faster fp32 parts)")
    max_nonfinite_steps: int = option(
        5, "a step whose gradient norm is NaN/Inf is skipped; this many in a row stop the run", check=at_least(1)
    )


@dataclass(frozen=True)
class LoraConfig(Checked):
    """The adapter of a LoRA run (``--use_peft_lora``)."""

    rank: int = option(32, "LoRA rank", flag="lora_r", aliases=("lora_rank",), scope=MODEL, check=at_least(1))
    alpha: float = option(
        32.0, "LoRA alpha (the update is scaled by alpha / rank)", flag="lora_alpha", scope=MODEL, check=greater_than(0)
    )
    dropout: float = option(0.0, "LoRA dropout", flag="lora_dropout", check=between(0, 1, high_open=True))
    target_modules: tuple[str, ...] = option(
        None,
        "comma-separated LoRA target modules, each a module name or its ending after a dot, as PEFT matches "
        "them; one that names no module of the transformer is refused (default: the model family's — "
        + "; ".join(f"{f.name}: {','.join(f.default_lora_targets)}" for f in FAMILIES.values())
        + ")",
        flag="lora_target_modules",
        convert=_patterns,
        unordered=True,
        scope=MODEL,
    )
    init_path: str | None = option(None, "initialise the LoRA from this safetensors file", flag="lora_path")
    export_format: str = option(
        "diffusers",
        "LoRA files written into every checkpoint and at the end: diffusers (pytorch_lora_weights.safetensors, "
        "alpha in its metadata, for load_lora_weights), comfyui (qwen_image_edit_lora_comfyui.safetensors: "
        "diffusion_model.* keys with .alpha tensors), or both",
        flag="lora_export_format",
        choices=("diffusers", "comfyui", "both"),
    )
    base_weight_dtype: str = option(
        "auto",
        "LoRA only: how the frozen transformer blocks' Linear weights are stored. auto (default): the compute "
        "dtype (bf16: ~41 GB for the 20B DiT); float8_e4m3fn: fp8 with one scale per output channel, computed in "
        "bf16 (~20 GB); DDP or one process, not FSDP",
        choices=("auto", *FP8_FORMATS),
    )


@dataclass(frozen=True)
class ModelConfig(Checked):
    """The transformer (and VAE) to train, and what of it trains."""

    pretrained: str | None = option(
        None, "Qwen-Image-Edit(-2509) diffusers folder", flag="pretrained_model_name_or_path", scope=MODEL
    )
    transformer_path: str | None = option(
        None,
        "a diffusers transformer folder to load instead, or one .safetensors (or weights-only .pt) state dict "
        "loaded into the base transformer",
        scope=MODEL,
    )
    vae_path: str | None = option(None, "the same for the VAE: a diffusers folder or one state-dict file", scope=MODEL)
    trainable_modules: tuple[str, ...] = option(
        ["."],
        'full fine-tuning: parameter-name substrings that train ("." = all); several, space or comma separated',
        nargs="+",
        convert=_patterns,
        unordered=True,
        scope=MODEL,
    )
    low_lr_modules: tuple[str, ...] = option(
        [],
        "substrings of parameters trained at half the LR",
        flag="trainable_modules_low_learning_rate",
        nargs="+",
        convert=_patterns,
        unordered=True,
        scope=MODEL,
    )
    lora: LoraConfig | None = None  # None: full fine-tuning
    gradient_checkpointing: bool = option(False, "trade compute for activation memory")
    condition_encoder_mode: str = option(
        "offline",
        "offline: embeddings from the shards; sync: encode prompts during training from the shard's images "
        "and text with the extraction code (for shards made with --skip_embeddings)",
        choices=("offline", "sync"),
        const_aliases=(("sync_text_encoder", "sync"),),
        scope=MODEL,
    )
    prompt_style: str = option(
        PROMPT_STYLES[0], prompt_style_help("sync mode only. "), choices=tuple(PROMPT_STYLES), scope=MODEL
    )


@dataclass(frozen=True)
class CheckpointConfig(Checked):
    """Where the run's checkpoints go and which one it resumes from."""

    output_dir: str = option("model-finetuned", "checkpoints, logs, validation images, exports", check=non_empty)
    every: int = option(
        500, "save a checkpoint every this many steps", flag="checkpointing_steps", scope=INVOCATION, check=at_least(1)
    )
    total_limit: int | None = option(
        None,
        "keep only the newest N checkpoints of this run (others' are never removed)",
        flag="checkpoints_total_limit",
        scope=INVOCATION,
        check=at_least(1),
    )
    resume_from: str | None = option(
        None,
        '"latest" (newest complete checkpoint), a checkpoint folder, or its name in --output_dir (checkpoint-500)',
        flag="resume_from_checkpoint",
        scope=INVOCATION,
    )
    overwrite: bool = option(
        False,
        "start a new run in an --output_dir that holds another run's checkpoints: the old run is moved into "
        "output_dir/overwritten-STAMP/, never deleted (without it such a start is refused)",
        flag="overwrite_output_dir",
        scope=INVOCATION,
    )


@dataclass(frozen=True)
class TrackingConfig(Checked):
    """Experiment tracking (accelerate trackers) and what is logged."""

    report_to: str = option(
        "auto",
        "tensorboard, wandb, all, or none; auto (default): wandb when it is installed, else tensorboard",
        convert=lambda value, args=None: resolve_report_to(value),
        scope=INVOCATION,
    )
    logging_dir: str = option("logs", "tracker folder, relative to --output_dir", scope=INVOCATION)
    project_name: str = option(
        "rededit-finetune", "project name given to the trackers", flag="tracker_project_name", scope=INVOCATION
    )
    report_model_info: bool = option(
        False,
        "also log the gradient norm of each parameter group (transformer_blocks.N, img_in, …) before clipping",
        scope=INVOCATION,
    )
    loss_window: int = 50  # running means of the loss per task and per N over this many batches


@dataclass(frozen=True)
class ValidationConfig(Checked):
    """Images rendered with the current weights every ``steps`` optimizer steps and at the end."""

    jsonl: str | None = option(
        None,
        "rows like the extraction input (0-3 source_image, instruction): rendered with the current weights "
        "every --validation_steps steps and at the end, into output_dir/validation/step-XXXXXX/ and the trackers",
        flag="validation_jsonl",
    )
    steps: int = option(500, "render the validation rows every N steps", flag="validation_steps", check=at_least(1))
    inference_steps: int = option(
        20, "denoising steps per validation image", flag="validation_inference_steps", check=at_least(1)
    )
    guidance_scale: float = option(
        4.0,
        "true classifier-free guidance scale (negative prompt: a blank); <= 1 turns guidance off",
        flag="validation_guidance_scale",
    )
    seed: int = StreamConfig.seed  # the one --seed
    caption_font: str | None = option(
        None,
        "TrueType/OpenType font for contact-sheet captions (default: the first font found that has CJK glyphs)",
    )


@dataclass(frozen=True)
class RunOptions(Checked):
    """What one invocation does: these flags shape the configs (config_from_args) and are not kept in them."""

    data_only: bool = option(False, "run the real data loader without a model")
    use_peft_lora: bool = option(False, "train a LoRA adapter instead of full weights", scope=MODEL)
    allow_recipe_change: bool = option(
        False,
        "resume even though the model settings differ from the run's output_dir/config.yaml (reported anyway)",
        scope=INVOCATION,
    )


@dataclass(frozen=True)
class PlanOptions(Checked):
    """``--plan``: the memory each GPU needs, from the model's config on the meta device."""

    plan: bool = option(
        False,
        "print the memory each GPU needs for this mode and exit; the model is built on the meta device from "
        "--pretrained_model_name_or_path's config.json, or give that flag the name qwen-image-edit-2509 or "
        "qwen-image-edit-2511",
        scope=INVOCATION,
    )
    plan_gpu_memory: float = option(
        80.0, "GiB per GPU to check the plan against", scope=INVOCATION, check=greater_than(0)
    )
    plan_processes: int | None = option(
        None, "processes (GPUs) of the run (default: WORLD_SIZE or 1)", scope=INVOCATION, check=at_least(1)
    )
    plan_num_sources: int = option(1, "source images per sample to plan for", scope=INVOCATION, check=between(0, 3))
    plan_text_tokens: int = option(512, "prompt embedding length to plan for", scope=INVOCATION, check=at_least(1))


@dataclass(frozen=True)
class CompatOptions(Checked):
    """Flags of the original tool's command lines, accepted and ignored (the launcher or the stream decides)."""

    local_rank: int = option(-1, "ignored: the rank comes from the launcher", scope=INVOCATION)
    nnodes: int = option(1, "ignored: the launcher sets the machines", scope=INVOCATION)
    num_processes_per_node: int = option(1, "ignored: the launcher sets the processes", scope=INVOCATION)
    streaming: bool = option(False, "ignored: shards are always streamed", scope=INVOCATION)
    num_train_epochs: int = option(
        1,
        "accepted for compatibility and ignored: the stream is endless and --max_train_steps decides the length",
        scope=INVOCATION,
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
