"""The tasks a run trains on, checked at start-up: found, mixed by weight, made alike, and tabled in the log.

Everything here runs once, before the first batch: a task that cannot be trained
on (unknown, made with another prompt style or encoder, a text-to-image task
without its null embedding) stops the run here with one line, not hours later.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.errors import UserError
from pipeline.shards.tasks import DataConfigError, Task, discover_tasks, task_from_patterns
from pipeline.train.config.data import DataConfig, StreamConfig
from pipeline.train.stream.mix import MixPlan, plan_mix

log = logging.getLogger("pipeline.train")


def load_tasks(data: DataConfig, storage_options: dict | None) -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    if data.meta_dir:
        wanted = None
        if data.task_weights is not None:  # tasks the weights do not name are not opened
            wanted = set(data.task_weights) - set(data.shard_patterns)
        tasks.update(discover_tasks(data.meta_dir, storage_options, wanted))
    for name, patterns in data.shard_patterns.items():
        tasks[name] = task_from_patterns(name, patterns, storage_options)
    if not tasks:
        raise DataConfigError("give --train_data_meta_dir or --train_shards")
    return tasks


def tasks_for_model(data: DataConfig, stream: StreamConfig, family) -> dict[str, Task]:
    """The run's tasks, read and checked against the model's family (``family``, a ``ModelFamily``) before any
    weight loads; a family whose prompts carry their slot layout from extraction is not encoded online."""
    if stream.online_prompts and family.fixed_conditions:
        raise UserError(
            f"--condition_encoder_mode sync: the {family.name} family's prompts are stored with their slot layout at "
            "extraction; extract the tasks and train from the stored embeddings"
        )
    tasks = load_tasks(data, stream.storage_options)
    check_family(tasks, data, family.name)
    return tasks


def check_family(tasks: dict[str, Task], data: DataConfig, family: str) -> None:
    """Every task the run may draw must hold embeddings for the model's family: checked before any weight loads
    (the hidden sizes may coincide — tiny kits share them — while the layouts do not)."""
    named = set(data.task_weights) if data.task_weights is not None else set(tasks)
    other = {name: task.family for name, task in sorted(tasks.items()) if name in named and task.family != family}
    if other:
        found = "; ".join(f"{name}: {fam}" for name, fam in other.items())
        raise DataConfigError(
            f"task(s) made for another model family than the model's ({family}): {found}; extract them with this "
            "model, or train them with a model of their family"
        )


def mix_tasks(tasks: dict[str, Task], data: DataConfig, stream: StreamConfig, rank: int = 0) -> MixPlan:
    """The mix plan over ``tasks`` after the start-up checks of the tasks it draws; rank 0 logs the table."""
    task_weights = data.task_weights if data.task_weights is not None else {name: 1.0 for name in tasks}
    plan = plan_mix(tasks, task_weights, data.source_count_weights)
    used = {name: tasks[name] for name in sorted({t for probs in plan.task_probs.values() for t in probs})}
    check_conditioning(used, data.allow_mixed_conditioning)
    check_batch_size(used, stream)
    check_null_embeddings(used, plan, stream)
    if rank == 0:
        log.info("mix: N %s; tasks per N %s", plan.n_probs, plan.task_probs)
        for line in describe_tasks(used, task_weights):
            log.info("%s", line)
    return plan


def conditioning(task: Task) -> dict[str, Any]:
    """What a task's embeddings were made with (``None`` where its manifest does not say)."""
    manifest = task.manifest or {}
    model = manifest.get("model") or {}
    return {
        "family": task.family, "prompt style": manifest.get("prompt_style"), "encoder": model.get("config_sha256"),
        "hidden size": task.hidden_size,
    }  # fmt: skip


def check_conditioning(tasks: dict[str, Task], allow_mixed: bool) -> None:
    """Refuse tasks whose embeddings were made differently: mixing them silently conditions the model two ways."""
    described = {name: conditioning(task) for name, task in tasks.items()}
    for key in ("family", "hidden size", "prompt style", "encoder"):
        values: dict[Any, list[str]] = {}
        for name, cond in described.items():
            if cond[key] is not None:
                values.setdefault(cond[key], []).append(name)
        if len(values) < 2:
            continue
        detail = "; ".join(f"{str(v)[:16]}: {', '.join(names)}" for v, names in values.items())
        if key == "hidden size":
            raise DataConfigError(f"tasks have embeddings of different hidden sizes ({detail}); one model takes one")
        if key == "family":
            raise DataConfigError(f"tasks were made for different model families ({detail}); one model takes one")
        if not allow_mixed:
            raise DataConfigError(
                f"tasks differ in {key} ({detail}): their embeddings condition the model differently. "
                "Re-extract them alike, leave some out of --train_data_weights, or pass --allow_mixed_conditioning"
            )
        log.warning("tasks differ in %s (%s); mixed on purpose (--allow_mixed_conditioning)", key, detail)


def check_batch_size(tasks: dict[str, Task], stream: StreamConfig) -> None:
    """A family whose transformer applies one row's layout to every row (Qwen-Image 2.1: row 0's slot mask and
    image shapes, silently when token counts agree) takes at most its ``max_batch_size`` rows per batch."""
    from pipeline import families

    for name in sorted({task.family for task in tasks.values()}):
        limit = families.get(name).max_batch_size
        if limit is not None and stream.batch_size > limit:
            raise UserError(
                f"--train_batch_size {stream.batch_size}: the {name} family's transformer takes {limit} sample(s) per "
                "batch (it applies the first row's image layout to every row); use --gradient_accumulation_steps "
                "for a larger effective batch"
            )


def check_null_embeddings(tasks: dict[str, Task], plan: MixPlan, stream: StreamConfig) -> None:
    """A task drawn with 0 sources drops its text to the null embedding: it must exist before the first step."""
    if stream.online_prompts or stream.text_drop_ratio <= 0:
        return
    missing = sorted(name for name in plan.task_probs.get(0, {}) if tasks[name].null_embedding_url is None)
    if missing:
        raise DataConfigError(
            f"task(s) {', '.join(missing)} have text-to-image samples but no null_embedding.npy, which "
            f"--text_drop_ratio {stream.text_drop_ratio} needs: re-extract them (extraction writes it), convert them "
            "with `shards_tools convert-legacy --null_embedding FILE`, or set --text_drop_ratio 0"
        )


def describe_tasks(tasks: dict[str, Task], weights: dict[str, float]) -> list[str]:
    """The start-up table: per task its weight, prompt style, encoder, hidden size and samples per N."""
    rows = [("task", "weight", "style", "encoder", "hidden", "samples N=0/1/2/3", "null")]
    for name, task in tasks.items():
        cond = conditioning(task)
        per_n = []
        for n in range(4):
            shards = task.shards.get(n, [])
            counts = [s.samples for s in shards]
            per_n.append("-" if not shards else "?" if None in counts else str(sum(counts)))
        rows.append(
            (
                name,
                f"{weights.get(name, 0):g}",
                str(cond["prompt style"] or "?"),
                (cond["encoder"] or "?")[:12],
                str(cond["hidden size"] or "?"),
                "/".join(per_n),
                "yes" if task.null_embedding_url else "no",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
