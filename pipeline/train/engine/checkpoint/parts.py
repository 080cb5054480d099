"""What goes into a checkpoint: named parts, each built from what it saves and saving its own files.

A part has ``save(folder)`` and ``load(folder)``; the :class:`~.manager.Checkpointer`
calls them by name.  JSON for states, safetensors for tensors: nothing here is
unpickled.  Parts: the model and its optimizer (:class:`ReplicatedWeights` under
DDP, :class:`FSDPShards` under FSDP), the LoRA files (:class:`LoraFiles`), any
JSON state (:class:`JsonPart`: scheduler, the step's non-finite counters), each
rank's RNG (:class:`RngPart`) and the data loader (:class:`DataPart`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.files import write_json_file
from pipeline.train.engine.checkpoint import fsdp_files
from pipeline.train.engine.checkpoint.integrity import CheckpointDamaged
from pipeline.train.engine.model import trainable_state
from pipeline.train.stream.state import elastic_resume, json_state, same_layout, worker_states

log = logging.getLogger(__name__)


class JsonPart:
    """A JSON-able state in one file: per rank (``{rank}`` in the name) or written by rank 0 and read by all."""

    def __init__(self, filename: str, get: Callable[[], Any], put: Callable[[Any], None], rank: int, optional=False):
        self.filename, self.get, self.put, self.rank, self.optional = filename, get, put, rank, optional
        self.per_rank = "{rank}" in filename

    def _file(self, folder: Path) -> Path:
        return folder / self.filename.format(rank=self.rank)

    def save(self, folder: Path) -> None:
        if self.per_rank or self.rank == 0:
            write_json_file(self._file(folder), self.get())

    def load(self, folder: Path) -> None:
        path = self._file(folder)
        if self.optional and not path.is_file():  # written by an older version
            return
        self.put(json.loads(path.read_text()))


class RngPart:
    """This rank's torch RNG states (CPU and CUDA), as safetensors."""

    def __init__(self, rank: int):
        self.rank = rank

    def save(self, folder: Path) -> None:
        import torch
        from safetensors.torch import save_file

        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(state, str(folder / f"rng_rank{self.rank}.safetensors"))

    def load(self, folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        path = folder / f"rng_rank{self.rank}.safetensors"
        if not path.is_file():  # resumed on more ranks than saved: this rank keeps its seeded generators
            log.info("%s has no RNG state for rank %d (saved on fewer ranks); kept the seeded one", folder, self.rank)
            return
        state = load_file(str(path))
        torch.set_rng_state(state["torch"])
        cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)


class DataPart(JsonPart):
    """The loader's state of this rank as JSON, in ``data_state_rank{r}.json``.

    Same ranks × workers as the checkpoint: the StatefulDataLoader restores itself (bitwise
    exact). Another layout: every rank reads the states of *all* old workers of all ranks and
    the stream takes them over (:meth:`MixedBatchDataset.set_elastic`): each sample of an
    epoch still comes exactly once.
    """

    def __init__(self, loader, rank: int, world: int):
        super().__init__(
            "data_state_rank{rank}.json",
            lambda: {"loader": json_state(loader.state_dict())},
            lambda state: loader.load_state_dict(state["loader"]),
            rank,
        )
        self.loader, self.world = loader, world

    def load(self, folder: Path) -> None:
        files = sorted(folder.glob("data_state_rank*.json"), key=lambda p: int(p.stem.rsplit("rank", 1)[1]))
        states = [json.loads(f.read_text())["loader"] for f in files]
        workers = self.loader.num_workers
        if same_layout(states, self.world, workers):
            self.loader.load_state_dict(states[self.rank])
            return
        next_step, partitions = elastic_resume(states)
        if self.rank == 0:
            log.warning(
                "resuming a checkpoint of %d rank(s) × %d worker(s) on %d × %d: the streams are taken over from "
                "all %d old partitions at loader step %d (every sample of an epoch still once)",
                len(states),
                len(worker_states(states[0])),
                self.world,
                max(workers, 1),
                len(partitions),
                next_step,
            )
        self.loader.dataset.set_elastic(next_step, partitions)


# ---------------------------------------------------------------------------------------------
# the model and its optimizer, without pickle


def optimizer_to_files(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state as safetensors tensors and JSON scalars, keyed ``param/key[/sub…]`` (bitsandbytes'
    8-bit AdamW nests its quantisation state in a dict per parameter)."""
    state = optimizer.state_dict()
    tensors, scalars, storages = {}, {}, set()

    def put(key: str, value: Any) -> None:
        if torch.is_tensor(value):
            value = value.detach().cpu().contiguous()
            if value.untyped_storage().data_ptr() in storages:  # shared (bitsandbytes' qmaps): its own copy
                value = value.clone()
            storages.add(value.untyped_storage().data_ptr())
            tensors[key] = value
        elif isinstance(value, dict) and value:
            for sub, inner in value.items():
                put(f"{key}/{sub}", inner)
        else:
            scalars[key] = value

    for idx, entry in state["state"].items():
        for key, value in entry.items():
            put(f"{idx}/{key}", value)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        parts = flat.split("/") if "/" in flat else flat.split(".", 1)  # "idx.key": checkpoints before nesting
        node = state.setdefault(int(parts[0]), {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class ReplicatedWeights:
    """DDP / one process: rank 0 writes the trainable weights and the optimizer's tensors as safetensors."""

    def __init__(self, model: torch.nn.Module, optimizer, rank: int):
        self.model, self.optimizer, self.rank = model, optimizer, rank  # the model unwrapped from DDP

    def save(self, folder: Path) -> None:
        if self.rank != 0:
            return
        save_file(trainable_state(self.model), str(folder / "trainable.safetensors"))
        tensors, meta = optimizer_to_files(self.optimizer)
        save_file(tensors, str(folder / "optimizer.safetensors"))
        write_json_file(folder / "optimizer.json", meta)

    def load(self, folder: Path) -> None:
        path = folder / "trainable.safetensors"
        weights = load_file(str(path))
        model = self.model
        absent = sorted({n for n, p in model.named_parameters() if p.requires_grad} - weights.keys())
        if absent:  # strict=False below lets the frozen base be absent, never a trained weight
            raise CheckpointDamaged(
                f"{path} lacks {len(absent)} of the run's trainable parameters, e.g. {absent[:3]}: it was saved by "
                "another run mode (LoRA targets, rank, trainable modules) or is damaged"
            )
        own = dict(model.named_parameters())
        other = [
            (k, tuple(v.shape), tuple(own[k].shape)) for k, v in weights.items() if k in own and own[k].shape != v.shape
        ]
        if other:  # checked before anything loads: a half-loaded model would train on
            name, saved, now = other[0]
            raise CheckpointDamaged(
                f"{path}: {name} was saved as {list(saved)}, this run has {list(now)} ({len(other)} such): the "
                "checkpoint was saved with other model settings (LoRA rank or targets, another model)"
            )
        result = model.load_state_dict(weights, strict=False)
        if result.unexpected_keys:
            raise CheckpointDamaged(f"{path}: weights this model does not have, e.g. {result.unexpected_keys[:3]}")
        meta = json.loads((folder / "optimizer.json").read_text())
        self.optimizer.load_state_dict(optimizer_from_files(load_file(str(folder / "optimizer.safetensors")), meta))


class FSDPShards:
    """FSDP: every rank writes its rows of the trainable weights and optimizer state (safetensors + JSON index)."""

    def __init__(self, model: torch.nn.Module, optimizer, trainable: list[str]):
        self.model, self.optimizer, self.trainable = model, optimizer, trainable

    def save(self, folder: Path) -> None:
        fsdp_files.save_shards(folder, self.model, self.optimizer, self.trainable)

    def load(self, folder: Path) -> None:
        fsdp_files.load_shards(folder, self.model, self.optimizer, self.trainable)


class LoraFiles:
    """The LoRA in the ``--lora_export_format`` files, written into the checkpoint (collective under FSDP)."""

    def __init__(self, export: Callable[[Path], Any]):
        self.export = export

    def save(self, folder: Path) -> None:
        self.export(folder)

    def load(self, folder: Path) -> None:  # the adapter itself comes back with the model part
        return None
