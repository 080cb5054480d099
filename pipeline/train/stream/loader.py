"""From a :class:`DataConfig` to the loader the loop iterates: tasks → mix plan → stream → StatefulDataLoader.

Also what every loop over that loader shares: the step check on each batch,
the per-step trace, and the loader state as plain JSON for checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipeline.common.workers import stream_worker_init
from pipeline.shards.tasks import DataConfigError, Task, discover_tasks, task_from_patterns
from pipeline.train.config import DataConfig, StreamConfig
from pipeline.train.stream.dataset import MixedBatchDataset, MixPlan, plan_mix

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


def build_dataset(data: DataConfig, stream: StreamConfig, rank: int, world: int) -> MixedBatchDataset:
    tasks = load_tasks(data, stream.storage_options)
    return MixedBatchDataset(tasks, mix_tasks(tasks, data, stream, rank), rank, world, stream)


def mix_tasks(tasks: dict[str, Task], data: DataConfig, stream: StreamConfig, rank: int = 0) -> MixPlan:
    """The mix plan over ``tasks`` after the start-up checks of the tasks it draws; rank 0 logs the table."""
    task_weights = data.task_weights if data.task_weights is not None else {name: 1.0 for name in tasks}
    plan = plan_mix(tasks, task_weights, data.source_count_weights)
    used = {name: tasks[name] for name in sorted({t for probs in plan.task_probs.values() for t in probs})}
    check_conditioning(used, data.allow_mixed_conditioning)
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
    hidden = model.get("hidden_size") or (manifest.get("embedding") or {}).get("hidden_size")
    return {"prompt style": manifest.get("prompt_style"), "encoder": model.get("config_sha256"), "hidden size": hidden}


def check_conditioning(tasks: dict[str, Task], allow_mixed: bool) -> None:
    """Refuse tasks whose embeddings were made differently: mixing them silently conditions the model two ways."""
    described = {name: conditioning(task) for name, task in tasks.items()}
    for key in ("hidden size", "prompt style", "encoder"):
        values: dict[Any, list[str]] = {}
        for name, cond in described.items():
            if cond[key] is not None:
                values.setdefault(cond[key], []).append(name)
        if len(values) < 2:
            continue
        detail = "; ".join(f"{str(v)[:16]}: {', '.join(names)}" for v, names in values.items())
        if key == "hidden size":
            raise DataConfigError(f"tasks have embeddings of different hidden sizes ({detail}); one model takes one")
        if not allow_mixed:
            raise DataConfigError(
                f"tasks differ in {key} ({detail}): their embeddings condition the model differently. "
                "Re-extract them alike, leave some out of --train_data_weights, or pass --allow_mixed_conditioning"
            )
        log.warning("tasks differ in %s (%s); mixed on purpose (--allow_mixed_conditioning)", key, detail)


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


def build_loader(dataset: MixedBatchDataset, data: DataConfig):
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(
        dataset,
        batch_size=None,
        num_workers=data.num_workers,
        worker_init_fn=stream_worker_init,
        prefetch_factor=data.prefetch_factor if data.num_workers else None,
        persistent_workers=False,
    )


def truncate_trace(path: str | None, step: int) -> int:
    """Drop the trace's lines after ``step`` (rank 0, before any rank writes again): a resume replays those steps,
    and the trace is the exactly-once record. Returns the lines dropped (a torn last line counts as one)."""
    if not path or not Path(path).is_file():
        return 0
    dropped, tmp = 0, f"{path}.tmp"
    with open(path, encoding="utf-8") as source, open(tmp, "w", encoding="utf-8") as kept:  # line by line
        for line in source:
            try:
                keep = int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):  # a line torn by the kill
                keep = False
            if keep:
                kept.write(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        os.replace(tmp, path)
        log.info("--data_trace: dropped %d line(s) after step %d, which this resume trains again", dropped, step)
    else:
        os.remove(tmp)
    return dropped


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
            "elements": batch.get("elements"),
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


def worker_states(loader_state: dict[str, Any]) -> list[dict[str, Any]]:
    """The dataset state of each DataLoader worker (one entry with 0 workers), in worker order."""
    if "dataset_state" in loader_state:  # num_workers=0: the main process iterates the dataset
        return [loader_state["dataset_state"]]
    snapshots = loader_state["_snapshot"]["_worker_snapshots"]
    return [snapshots[f"worker_{w}"]["dataset_state"] for w in range(len(snapshots))]


def same_layout(states: list[dict[str, Any]], world: int, workers: int) -> bool:
    """Whether loader states (one per old rank) were written by ``world`` ranks × ``workers`` DataLoader workers.

    0 and 1 workers both hold one dataset state but are different layouts: the loader's own state differs
    (``dataset_state`` in the main process, ``_snapshot`` of a worker), and StatefulDataLoader refuses the
    other's; they resume through the elastic path like any other change."""
    in_process = workers == 0
    return len(states) == world and all(
        ("dataset_state" in s) == in_process and len(worker_states(s)) == max(workers, 1) for s in states
    )


def elastic_resume(states: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """From the loader states of every old rank: the next loader step and every old partition's dataset state
    (partition = rank × W + worker), for :meth:`MixedBatchDataset.set_elastic`."""
    partitions = [w for state in states for w in worker_states(state)]
    first_rank = worker_states(states[0])
    next_step = first_rank[0].get("base", 0) + sum(w.get("made", 0) for w in first_rank)
    return next_step, partitions


def json_state(state: Any) -> Any:
    """StatefulDataLoader state as plain JSON (a round trip checks nothing un-JSON-able slipped in)."""
    return json.loads(json.dumps(state))


def stop_workers(batches) -> None:
    """Shut a loader iterator's worker processes down now (a no-op without workers)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
