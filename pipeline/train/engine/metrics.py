"""What a step logs beyond its loss: the loss of every rank's batch by task and by source count.

Each rank trains on its own (task, N) draw, so a rank-local loss says little
about a mix of many tasks.  Every optimizer step, the (task, N, loss) of every
micro-batch of every rank is gathered (one small all-gather); the step's loss is
their mean, and running means over the last ``window`` batches of each task and
each N show which part of the mix diverges.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque

import torch


class LossBoard:
    """Running means of the loss per task and per N, fed with every rank's batches (identical on all ranks)."""

    def __init__(self, tasks: list[str], window: int = 50):
        self.tasks = sorted(tasks)
        self.index = {t: i for i, t in enumerate(self.tasks)}
        self.window = window
        self.by_task: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self.by_n: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=window))

    def encode(self, rows: list[tuple[str, int, float]]) -> torch.Tensor:
        """This rank's micro-batches as a [rows, 3] float64 tensor (task index, N, loss) for the gather."""
        return torch.tensor([[self.index[t], n, loss] for t, n, loss in rows], dtype=torch.float64)

    def add(self, gathered: torch.Tensor) -> dict[str, float]:
        """Take every rank's rows; return this step's scalars: the mean loss over ranks and the running means."""
        rows = [(self.tasks[int(t)], int(n), float(loss)) for t, n, loss in gathered.reshape(-1, 3).tolist()]
        for task, n, loss in rows:
            self.by_task[task].append(loss)
            self.by_n[n].append(loss)
        logs = {"loss": sum(r[2] for r in rows) / max(len(rows), 1)}
        for task in {r[0] for r in rows}:
            values = self.by_task[task]
            logs[f"loss_by_task/{task}"] = sum(values) / len(values)
        for n in {r[1] for r in rows}:
            values = self.by_n[n]
            logs[f"loss_by_sources/{n}"] = sum(values) / len(values)
        return logs


def group_of(name: str) -> str:
    """Parameter-group name for ``--report_model_info``: ``transformer_blocks.7``, ``img_in``, ``proj_out`` …"""
    parts = name.removeprefix("module.").removeprefix("_orig_mod.").split(".")
    if len(parts) > 1 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def group_grad_norms(named_params) -> dict[str, float]:
    """Gradient L2 norm per parameter group; collective under FSDP (sharded gradients), so call it on every rank."""
    squares: dict[str, torch.Tensor] = {}
    for name, param in named_params:
        if param.grad is None:
            continue
        value = torch.linalg.vector_norm(param.grad.detach().float())
        if hasattr(value, "full_tensor"):  # a DTensor: the norm of this rank's shard, reduced here
            value = value.full_tensor()
        key = group_of(name)
        squares[key] = squares.get(key, 0.0) + value**2
    return {f"grad_norm_by_group/{k}": float(v) ** 0.5 for k, v in sorted(squares.items())}


def step_logs(result: dict[str, float], lr: float, samples: int, seconds: float, nonfinite_steps: int) -> dict:
    """What the trackers get for one optimizer step (a skipped step's non-finite norm is logged as 0)."""
    norm = result["grad_norm"]
    return {
        **{k: v for k, v in result.items() if k not in ("waited", "grad_norm")},
        "lr": lr,
        "grad_norm": norm if math.isfinite(norm) else 0.0,
        "samples_per_s": samples / max(seconds, 1e-9),
        "data_wait_fraction": result["waited"] / max(seconds, 1e-9),
        "nonfinite_steps": nonfinite_steps,
    }
