"""The stream's state and its elastic resume: what a checkpoint holds of the data, and how it comes back.

A DataLoader worker's dataset state (``MixedBatchDataset.state_dict``) is a handful
of numbers per stream (the cursor, the generation, the skipped count) plus
references to the samples waiting in pools and buffers; the loader's state holds
one per worker (or the main process's). Same layout: each worker restores its own
(:func:`restore`). Another layout of ranks × workers (0 and 1 worker included):
every rank reads all old partitions' states and each worker takes its streams over
(:func:`elastic_resume`, :func:`takeover_states`, then each stream's own merge): the
cursors merge and every sample of the epoch still comes once.

Everything here is a pure function from states to states (or a refusal): the
dataset applies them to itself, and each stage restores and merges its own part.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.shards.tasks import DataConfigError

DATA_STATE_VERSION = 2


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


def check_version(state: dict[str, Any]) -> None:
    """Refuse a worker state written by a newer version (its fields may mean something else)."""
    version = state.get("version", 1)
    if version > DATA_STATE_VERSION:
        raise DataConfigError(
            f"the checkpoint's data state is version {version}; this version reads up to "
            f"{DATA_STATE_VERSION}: resume with the version that wrote it"
        )


def untouched(state: dict[str, Any]) -> bool:
    """Whether a worker had made no batch and read no stream when its state was taken: nothing to restore."""
    return state["made"] == 0 and not state["streams"]


def check_same_layout(state: dict[str, Any], workers: int, world: int) -> None:
    """A worker's own state must be of the run's layout; another layout resumes through :func:`takeover_states`."""
    if state["workers"] != workers or state["world_size"] != world:
        raise DataConfigError(  # the loop takes another layout over with set_elastic; this is a direct misuse
            f"this worker's state is of {state['world_size']} rank(s) × {state['workers']} worker(s), the run "
            f"has {world} × {workers}; resume through the checkpoint folder (set_elastic)"
        )


def stream_key(key: str) -> tuple[str, int]:
    """``"task|N"`` → (task, N)."""
    task, n = key.rsplit("|", 1)
    return task, int(n)


def stream_states(state: dict[str, Any]) -> list[tuple[str, int, dict[str, Any] | None]]:
    """(task, N, the stream's state) of every stream of a worker's state; None where the state predates the
    sample-level order (version 1): its positions cannot be mapped, the stream starts a new epoch."""
    mappable = state.get("version", 1) >= 2
    return [(*stream_key(key), stream if mappable else None) for key, stream in state["streams"].items()]


def takeover_states(partitions: list[dict[str, Any]], untouched_state) -> dict[str, list[dict[str, Any]]]:
    """Every stream's states across all old partitions, one per partition: a partition that never read a stream
    had consumed nothing of it, and gets ``untouched_state(template, part)`` (the stream's own empty state of
    that layout). Streamed states (no cursor) are passed on as they are, to be refused by their source."""
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for partition in partitions:
        for key, stream_state in partition["streams"].items():
            by_stream.setdefault(key, []).append(stream_state)
    for olds in by_stream.values():
        present = {o["cursor"]["part"] for o in olds if "cursor" in o}
        template = next((o for o in olds if "cursor" in o), None)
        if template is not None:
            olds.extend(untouched_state(template, p) for p in range(len(partitions)) if p not in present)
    return by_stream
