"""The stream's state and its elastic resume: what a checkpoint holds of the data, and how it comes back.

A DataLoader worker's dataset state (``MixedBatchDataset.state_dict``) is a handful
of numbers per stream (the cursor, the generation, the skipped count) plus
references to the samples waiting in pools and buffers; the loader's state holds
one per worker (or the main process's). Same layout: each worker restores its own
(:func:`restore`). Another layout of ranks × workers (0 and 1 worker included):
every rank reads all old partitions' states and each worker takes its streams over
(:func:`elastic_resume`, :func:`take_over`): the cursors merge and every sample of
the epoch still comes once.
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


def restore(dataset, state: dict[str, Any]) -> None:
    """A worker's own state of the same layout: every stream restored (bitwise exact)."""
    version = state.get("version", 1)
    if version > DATA_STATE_VERSION:
        raise DataConfigError(
            f"the checkpoint's data state is version {version}; this version reads up to "
            f"{DATA_STATE_VERSION}: resume with the version that wrote it"
        )
    dataset.base = state.get("base", 0)
    if state["made"] == 0 and not state["streams"]:
        return  # this worker had not made a batch when the checkpoint was taken: nothing to restore
    if state["workers"] != dataset._workers or state["world_size"] != dataset.world_size:
        raise DataConfigError(  # the loop takes another layout over with set_elastic; this is a direct misuse
            f"this worker's state is of {state['world_size']} rank(s) × {state['workers']} worker(s), the run "
            f"has {dataset.world_size} × {dataset._workers}; resume through the checkpoint folder (set_elastic)"
        )
    dataset.made = state["made"]
    for key, stream_state in state["streams"].items():
        task, n = key.rsplit("|", 1)
        stream = dataset._stream(task, int(n))
        if version < 2:  # written before the sample-level order: positions cannot be mapped
            stream.start_new_epoch({"generation": 0})
        else:
            stream.load_state_dict(stream_state)


def take_over(dataset, elastic: dict[str, Any]) -> None:
    """This worker's part of a resume from another layout: its next step, and every stream merged."""
    dataset.base, dataset.made = elastic["next_step"], 0
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for partition in elastic["partitions"]:
        for key, stream_state in partition["streams"].items():
            by_stream.setdefault(key, []).append(stream_state)
    parts = len(elastic["partitions"])
    for key, olds in by_stream.items():
        task, n = key.rsplit("|", 1)
        if task not in dataset.tasks or int(n) not in dataset.tasks[task].shards:
            continue
        # partitions that never read this stream had consumed nothing of it
        present = {o["cursor"]["part"] for o in olds if "cursor" in o}
        template = next((o for o in olds if "cursor" in o), None)
        if template is not None:
            for p in range(parts):
                if p not in present:
                    olds.append(
                        {
                            **template,
                            "cursor": {**template["cursor"], "part": p, "k": 0},
                            "pools": {"arrivals": 0, "pools": []},
                            "skipped": 0,
                        }
                    )
        dataset._stream(task, int(n)).load_elastic(olds)
    dataset._elastic = None
