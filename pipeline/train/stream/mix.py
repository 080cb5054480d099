"""Mixing by task and by source count: the weights checked against the data, and each step's draws.

Step ``s`` draws N from (seed, s) — the same on every rank — then a task with data
at N from (seed, rank, s): pure functions of the seed, the rank and the step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.shards.format import SOURCE_COUNTS
from pipeline.shards.tasks import DataConfigError, Task
from pipeline.train.stream.seeding import SOURCE_COUNT, TASK

log = logging.getLogger(__name__)


def draw_num_sources(seed: int, step: int, n_probs: dict[int, float]) -> int:
    """N for ``step``: a function of (seed, step) only, so every rank draws the same."""
    ns = sorted(n_probs)
    return ns[int(SOURCE_COUNT.rng(seed, step).choice(len(ns), p=[n_probs[n] for n in ns]))]


def draw_task(seed: int, rank: int, step: int, task_probs: dict[str, float]) -> str:
    """Task for (rank, step) among those with data at this step's N, by weight."""
    names = sorted(task_probs)
    return names[int(TASK.rng(seed, rank, step).choice(len(names), p=[task_probs[t] for t in names]))]


@dataclass
class MixPlan:
    """Normalised source-count probabilities and, per N, task probabilities."""

    n_probs: dict[int, float]
    task_probs: dict[int, dict[str, float]]


def plan_mix(tasks: dict[str, Task], task_weights: dict[str, float], n_weights: dict[str, float]) -> MixPlan:
    """Check the weights against the data; warn about counts without data; renormalise."""
    unknown = sorted(set(task_weights) - set(tasks))
    if unknown:
        raise DataConfigError(f"--train_data_weights names unknown task(s) {unknown}; available tasks: {sorted(tasks)}")
    bad_n = sorted(k for k in n_weights if k not in {str(n) for n in SOURCE_COUNTS})
    if bad_n:
        raise DataConfigError(f"--train_src_img_num_weights keys must be 0-3, got {bad_n}")
    used = {t: w for t, w in task_weights.items() if w > 0}
    task_probs: dict[int, dict[str, float]] = {}
    n_probs: dict[int, float] = {}
    for key, weight in n_weights.items():
        n = int(key)
        if weight <= 0:
            continue
        having = {t: w for t, w in used.items() if tasks[t].shards.get(n)}
        if not having:
            log.warning(
                "source count %d has weight %g but no listed task has data with %d source(s); ignored", n, weight, n
            )
            continue
        total = sum(having.values())
        task_probs[n] = {t: w / total for t, w in having.items()}
        n_probs[n] = weight
    if not n_probs:
        raise DataConfigError(
            "nothing to train on: no source count with positive weight has data in the listed tasks "
            f"(tasks: { {t: sorted(tasks[t].counts()) for t in used} })"
        )
    total = sum(n_probs.values())
    return MixPlan({n: w / total for n, w in n_probs.items()}, task_probs)
