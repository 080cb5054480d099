"""The run options: the folder and its checkpoints (:class:`CheckpointConfig`), tracking, validation images, and
the flags of one invocation (``--data_only``, ``--plan``, the original tool's ignored flags)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.common.options import (
    INVOCATION,
    MODEL,
    Checked,
    at_least,
    between,
    greater_than,
    non_empty,
    option,
)
from pipeline.train.config.data import StreamConfig


def resolve_report_to(value: str) -> str:
    """``auto`` (the default) → wandb when the package is installed, else tensorboard (the original's default
    is wandb, which fails where it is not installed)."""
    if value != "auto":
        return value
    import importlib.util

    return "wandb" if importlib.util.find_spec("wandb") is not None else "tensorboard"


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
