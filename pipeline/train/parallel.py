"""FSDP2 for the transformer: shard it ourselves, checkpoint its shards, gather it for export.

We wrap each transformer block, then the root, with PyTorch's ``fully_shard`` (as
torchtitan does) instead of going through accelerate's FSDP plugin: this path is
the same on GPUs (NCCL) and on CPUs (gloo), so the tests run the very code users
run.  Sharded parameters are fp32 master weights for full fine-tuning (the frozen
base stays in the compute dtype for LoRA); ``MixedPrecisionPolicy`` gathers them in
the compute dtype for forward and backward and reduces gradients in fp32.

Checkpoints hold only the trainable parameters and their optimizer state, saved
with ``torch.distributed.checkpoint`` (each rank writes its shards; no pickle of
tensors, and a resume reads them back into the same layout).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.train.model import weight_dtype

log = logging.getLogger(__name__)

FSDP_STATE = "fsdp"  # folder inside a checkpoint


def shard_transformer(transformer: torch.nn.Module, mixed_precision: str | None, device: torch.device):
    """Shard every transformer block, then the rest, over all ranks (in place; returns the model)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # one process: accelerate starts no process group; FSDP over 1 rank still runs
        import os
        import socket

        if "MASTER_PORT" not in os.environ:  # launched without torchrun
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    compute = weight_dtype(mixed_precision) if mixed_precision in ("bf16", "fp16") else None  # None: as stored
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    # no transformer.to(device) first: fully_shard moves each block to the mesh's device as it shards it,
    # so a GPU holds one unsharded block at a time, never the whole 20B model
    for block in transformer.transformer_blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(transformer, mesh=mesh, mp_policy=policy)
    return transformer


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def sharded_state(model: torch.nn.Module, optimizer, names: set[str]) -> dict[str, Any]:
    """The trainable parameters' shards and the optimizer's, as DCP state (collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = {k: v for k, v in get_model_state_dict(model).items() if k in names}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_shards(folder: Path, model: torch.nn.Module, optimizer, names: set[str]) -> None:
    """Collective: every rank writes its shards under ``folder/fsdp``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(model, optimizer, names), checkpoint_id=str(folder / FSDP_STATE))


def load_shards(folder: Path, model: torch.nn.Module, optimizer, names: set[str]) -> None:
    """Collective: read the shards back into the sharded model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = sharded_state(model, optimizer, names)
    # parameters that never received a gradient (outputs that do not reach the loss) have no optimizer
    # state in the checkpoint; the fresh entries made for them here are never used by AdamW either
    dcp.load(
        state,
        checkpoint_id=str(folder / FSDP_STATE),
        planner=dcp.default_planner.DefaultLoadPlanner(allow_partial_load=True),
    )
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def gather_full_state(model: torch.nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Collective: the full (unsharded) state dict on rank 0's CPU, empty on the other ranks.

    ``names`` limits it to those parameters (a LoRA adapter) so the frozen base is never gathered.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if names is None:
        return get_model_state_dict(model, options=options)
    # gather parameter by parameter: only the ones asked for travel
    full = {}
    for name, param in model.named_parameters():
        if name in names:
            value = param.full_tensor() if hasattr(param, "full_tensor") else param
            if torch.distributed.get_rank() == 0:
                full[name] = value.detach().cpu().clone()
    return full
