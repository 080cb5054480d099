"""The process group: where this process sits in a torchrun / accelerate launch, and joining and leaving the group.

:class:`~pipeline.common.collective.Collective` runs the run's own collectives over it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in a torchrun / accelerate launch (rank 0 of 1 when launched alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # this process's GPU on its node
    node_rank: int = 0  # which node (torchrun's GROUP_RANK): per-node work such as caches goes by it
    fsdp_requested: bool = False  # accelerate launch with an FSDP configuration


def distributed_env() -> DistributedEnv:
    """The one reader of ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (and accelerate's ``ACCELERATE_USE_FSDP``)."""
    return DistributedEnv(
        rank=int(os.environ.get("RANK", "0")),
        world=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        node_rank=int(os.environ.get("GROUP_RANK", "0")),
        fsdp_requested=os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"),
    )


def join_process_group(device_type: str = "cpu", timeout_s: float | None = None, alone: bool = False) -> None:
    """Start this process's group, once: gloo on CPU, nccl on CUDA. Under a launcher (``WORLD_SIZE`` > 1) always;
    launched alone only with ``alone`` (FSDP over one rank needs a group of one: a free local port)."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized() or (distributed_env().world == 1 and not alone):
        return
    if "MASTER_PORT" not in os.environ:  # launched without torchrun
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", **timeout)


def leave_process_group(together: bool = False) -> None:
    """Tear the process group down on the way out (a gloo rank whose peer exited first aborts in its teardown).

    ``together``: every rank reached the end of the run, so they first wait for each other — rank 0 may still be
    writing (a manifest, an export) while the others would tear down under it, and gloo then aborts a rank with
    "terminate called without an active exception". Only when all ranks get here: after an error a peer may
    never come.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
