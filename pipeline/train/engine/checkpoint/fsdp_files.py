"""FSDP2 shard files in a checkpoint: each rank's rows of the trainable weights and optimizer state, no pickle.

Each rank writes its shards as safetensors and the state's structure as JSON (not
``torch.distributed.checkpoint``, whose ``.metadata`` is a pickle that a resume
would load); a resume reads every tensor's rows back on any number of ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.files import write_json_file

FSDP_STATE = "fsdp"  # folder inside a checkpoint


def sharded_state(model: torch.nn.Module, optimizer, names: set[str]) -> dict[str, Any]:
    """The trainable parameters' shards and the optimizer's, as DCP state (collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = {k: v for k, v in get_model_state_dict(model).items() if k in names}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, optimizer)}


SHARD_FILE = "rank{rank}.safetensors"  # this rank's shards of every tensor
SHARD_INDEX = "rank{rank}.json"  # the state's structure with each tensor's global shape and row offset


def _shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows of dimension 0 that FSDP2's ``Shard(0)`` gives ``rank``: ``torch.chunk`` sizes, the last ones short."""
    chunk = -(-rows // world) if rows else 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows) - start


def _local(value: torch.Tensor) -> tuple[torch.Tensor, list[int], int]:
    """(this rank's part, the global shape, its first row): a DTensor sharded on dim 0, or a replicated tensor."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(value, DTensor):
        return value.detach(), list(value.shape), 0
    if tuple(value.placements) != (Shard(0),):
        raise NotImplementedError(f"checkpoints hold FSDP2 Shard(0) tensors; got placements {value.placements}")
    local = value.to_local().detach()
    rank, world = value.device_mesh.get_local_rank(), value.device_mesh.size()
    start, count = _shard_rows(value.shape[0], rank, world)
    if local.shape[0] != count:
        raise RuntimeError(f"a shard of {count} rows was expected, FSDP holds {local.shape[0]}")
    return local, list(value.shape), start


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor], shapes: dict[str, Any]) -> Any:
    """``value`` as JSON with each tensor replaced by ``{"tensor": key}`` (the tensors go to ``tensors``)."""
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v, f"{path}/{k}", tensors, shapes) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"list": [_encode(v, f"{path}/{i}", tensors, shapes) for i, v in enumerate(value)]}
    if torch.is_tensor(value):
        from torch.distributed.tensor import DTensor

        local, shape, start = _local(value)
        tensors[path] = local.cpu().contiguous()
        shapes[path] = {"shape": shape, "start": start, "sharded": isinstance(value, DTensor)}
        return {"tensor": path}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(f"{path}: a {type(value).__name__} cannot go into a checkpoint without pickle")


def save_shards(folder: Path, model: torch.nn.Module, optimizer, names: set[str]) -> None:
    """Collective: every rank writes its shards as ``fsdp/rank{r}.safetensors`` and the state's structure, each
    tensor's global shape and this rank's rows, as ``fsdp/rank{r}.json``: nothing a resume unpickles."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    rank, world = dist.get_rank(), dist.get_world_size()
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, Any] = {}
    structure = _encode(sharded_state(model, optimizer, names), "", tensors, shapes)
    target = folder / FSDP_STATE
    target.mkdir(exist_ok=True)
    save_file(tensors, str(target / SHARD_FILE.format(rank=rank)))
    write_json_file(
        target / SHARD_INDEX.format(rank=rank), {"world_size": world, "structure": structure, "tensors": shapes}
    )


class ShardFiles:
    """The shard files of every rank of a saved FSDP state, read lazily by row ranges (any new world size)."""

    def __init__(self, folder: Path):
        self.folder = folder
        first = folder / SHARD_INDEX.format(rank=0)
        if (folder / ".metadata").exists():
            raise CheckpointFormatError(
                f"{folder} was written by torch.distributed.checkpoint, whose .metadata is a pickle this version "
                "never loads: export it with the version that wrote it (--export_checkpoint) and start from the export"
            )
        if not first.is_file():
            raise CheckpointFormatError(f"{folder}: no {first.name}; not an FSDP state this version wrote")
        self.world = int(json.loads(first.read_text())["world_size"])
        self.indexes = [json.loads((folder / SHARD_INDEX.format(rank=r)).read_text()) for r in range(self.world)]
        self._open: dict[int, Any] = {}

    def _file(self, rank: int):
        from safetensors import safe_open

        if rank not in self._open:
            self._open[rank] = safe_open(str(self.folder / SHARD_FILE.format(rank=rank)), framework="pt")
        return self._open[rank]

    def rows(self, key: str, start: int, count: int) -> torch.Tensor:
        """Rows ``[start, start + count)`` of tensor ``key`` (all of it when it was not sharded), from the ranks
        that saved them."""
        pieces = []
        for rank, index in enumerate(self.indexes):
            saved = index["tensors"].get(key)
            if saved is None:
                continue
            handle = self._file(rank)
            if not saved["sharded"]:  # replicated (an optimizer step): every rank saved all of it
                return handle.get_tensor(key)
            first, size = saved["start"], handle.get_slice(key).get_shape()[0]
            lo, hi = max(start, first), min(start + count, first + size)
            if lo < hi:
                pieces.append(handle.get_slice(key)[lo - first : hi - first])
        if sum(p.shape[0] for p in pieces) != count:
            raise CheckpointFormatError(f"{self.folder}: the saved shards of {key!r} do not cover its rows")
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]


class CheckpointFormatError(UserError):
    """A checkpoint file that is not what this version writes."""


def _decode(node: Any, template: Any, files: ShardFiles) -> Any:
    """The saved structure with each ``{"tensor": key}`` read into the matching template tensor (in place)."""
    if "dict" in node:
        template = template if isinstance(template, dict) else {}
        by_name = {str(k): k for k in template}
        out = dict(template)  # entries the checkpoint does not have keep the template's (fresh) value
        for name, child in node["dict"].items():
            key = by_name.get(name, name)
            out[key] = _decode(child, template.get(key), files)
        return out
    if "list" in node:
        items = list(template) if isinstance(template, list | tuple) else []
        return [_decode(child, items[i] if i < len(items) else None, files) for i, child in enumerate(node["list"])]
    if "tensor" in node:
        key = node["tensor"]
        if not torch.is_tensor(template):
            raise CheckpointFormatError(f"{files.folder}: {key!r} is in the checkpoint but not in this run's state")
        local, shape, start = _local(template)
        saved_shape = files.indexes[0]["tensors"][key]["shape"]
        if shape != saved_shape:
            raise CheckpointFormatError(f"{files.folder}: {key!r} was saved as {saved_shape}, the run has {shape}")
        if local.numel():  # a rank may hold no rows of a small tensor
            local.copy_(files.rows(key, start, local.shape[0] if local.dim() else 0))
        return template
    return node["value"]


def load_shards(folder: Path, model: torch.nn.Module, optimizer, names: set[str]) -> None:
    """Collective: read the shards back into the sharded model and optimizer (on any number of ranks).

    Every trainable parameter must be in the checkpoint. Parameters that never received a
    gradient (outputs that do not reach the loss) have no optimizer state there; they keep
    the fresh entries made here, which AdamW never uses either.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    files = ShardFiles(folder / FSDP_STATE)
    template = sharded_state(model, optimizer, names)
    saved = files.indexes[0]["structure"]
    absent = sorted(set(template["model"]) - set(saved["dict"]["model"]["dict"]))
    if absent:
        raise CheckpointFormatError(
            f"{folder / FSDP_STATE}: {len(absent)} trainable parameter(s) are not in the checkpoint, e.g. {absent[:3]}"
        )
    state = _decode(saved, template, files)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
