"""The model options: the model and its LoRA (:class:`ModelConfig`, :class:`LoraConfig`), the flow-matching loss
(:class:`FlowConfig`) and the optimiser (:class:`OptimConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.common.options import (
    MODEL,
    Checked,
    at_least,
    between,
    greater_than,
    option,
)
from pipeline.families import FAMILIES, PROMPT_STYLES, prompt_style_help
from pipeline.train.config.data import StreamConfig, _patterns

# Adam's first step is lr / (1 - beta1) in float32 (max 3.4e38): far above any useful rate, far below an overflow
# (a traceback inside the optimizer) even after --scale_lr; a diverging rate below it ends as non-finite training
MAX_LEARNING_RATE = 1e6
FP8_FORMATS = ("float8_e4m3fn",)  # --base_weight_dtype choices besides auto (torch dtypes of these names)


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
