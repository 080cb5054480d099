"""The transformer built on ``meta`` and filled where it lives, tensor by tensor: no rank holds the whole model.

``from_pretrained`` builds the whole transformer in host memory first: for full
fine-tuning of the 20B DiT that is ~82 GB of fp32 on every rank before FSDP shards
it, and a LoRA run on one card reads the whole bf16 model (~41 GB) into host memory.
Here (PyTorch's and accelerate's documented route: build on ``meta``, then load):

* the model is built with its parameters on ``meta`` (``accelerate.init_empty_weights``),
  cast to the training dtype, the adapter added and the trainable set chosen — all free;
* under FSDP the ranks shard the empty model, allocate only their own rows
  (``to_empty``), and each fills its rows from the safetensors files, reading only
  them (``safe_open(...).get_slice(key)[start:stop]``): host memory per rank ≈ its
  share (on the GPU, not even that) + one slice;
* on one process or under DDP each block is allocated, filled tensor by tensor,
  quantised to fp8 when asked, and moved to its device before the next: host memory ≈
  one block.

Values are exactly the file's converted to the parameter's dtype (``copy_``), as
``from_pretrained(torch_dtype=...)`` converts them; a LoRA adapter's initial values are
computed from the seed and each parameter's name alone (:func:`lora_init`), so every
rank and every mode start from the same adapter.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import UserError

log = logging.getLogger(__name__)

BASE_LAYER = ".base_layer."  # PEFT's name for a wrapped layer's own weights
# prefixes other tools put before the diffusers parameter names (ComfyUI, accelerate, the original's saves)
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "module.")


def file_names(keys: list[str], own, path, what: str = "transformer") -> dict[str, str]:
    """Each key of the weights file ``path`` → the name it holds in the model (``own``: its names): known prefixes
    removed where the plain key is not a name. A key the model does not have is the user's mistake, said at once."""
    names = {}
    for key in keys:
        name = key
        for prefix in KEY_PREFIXES:
            if name not in own and name.startswith(prefix):
                name = name[len(prefix) :]
        names[key] = name
    unknown = sorted(n for n in names.values() if n not in own)
    if unknown:
        raise UserError(
            f"--{what}_path {path}: {len(unknown)} key(s) the {what} does not have, e.g. {unknown[:3]} "
            f"(is it a {what} state dict?)"
        )
    return names


@dataclass
class WeightSource:
    """Where every parameter's values come from: a (safetensors file, key) per weight name, and values computed
    here (a LoRA adapter's), by parameter name."""

    files: dict[str, tuple[Path, str]]
    origin: str = ""  # the folder the weights come from, for messages
    computed: dict[str, torch.Tensor] = field(default_factory=dict)
    handles: dict[Path, object] = field(default_factory=dict)  # each file opened once (its header parsed once)

    def value(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """Parameter ``name``'s values (only ``rows`` of them when given), read now."""
        if name in self.computed:
            full = self.computed[name]
            return full if rows is None else full[rows[0] : rows[1]]
        path, key = self.files[name.replace(BASE_LAYER, ".")]
        if path not in self.handles:
            from safetensors import safe_open

            self.handles[path] = safe_open(str(path), framework="pt", device="cpu")
        tensor = self.handles[path].get_slice(key)
        return tensor[:] if rows is None else tensor[rows[0] : rows[1]]


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' file name (no variant)
WEIGHTS_INDEX = f"{WEIGHTS_NAME}.index.json"  # and its index, when the weights are split


def folder_weight_files(folder: Path) -> dict[str, Path] | None:
    """Which file holds each tensor of a diffusers model folder: exactly what ``from_pretrained`` (no variant)
    reads — the files its index names when there is one, else ``diffusion_pytorch_model.safetensors``. Other
    weight files beside them (a stale single-file download, an ``.fp16`` variant) are never read, and said so.
    None when the folder holds no safetensors at all (the model then loads the usual way)."""
    from safetensors import SafetensorError, safe_open

    present = sorted(folder.glob("*.safetensors"))
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, AttributeError) as exc:
            raise UserError(f"{index}: not a readable weights index ({exc})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: its weight_map is not a mapping of tensor names to file names")
        named = {name: folder / file for name, file in weight_map.items()}
    elif (folder / WEIGHTS_NAME).is_file():
        named = None
    elif present:
        raise UserError(
            f"{folder} holds {', '.join(p.name for p in present[:3])} but neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX}: "
            "diffusers would not load it; rename the file or write its index"
        )
    else:
        return None
    files = sorted(set(named.values())) if named is not None else [folder / WEIGHTS_NAME]
    ignored = [p.name for p in present if p not in files]
    if ignored:
        log.warning("%s: not read, as diffusers does not read them: %s", folder, ", ".join(ignored))
    held: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                held.update({key: path for key in handle.keys()})
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    if named is not None:
        lies = sorted(name for name, path in named.items() if held.get(name) != path)
        if lies:
            raise UserError(f"{index} names {len(lies)} tensor(s) its files do not hold where it says, e.g. {lies[:3]}")
    return held


def safetensors_source(model_path: str, transformer_path: str | None) -> WeightSource | None:
    """The transformer's weights by name: its folder's safetensors files (:func:`folder_weight_files`), then a
    single ``--transformer_path`` file over them; None when they are not all safetensors (then the model loads the
    usual way)."""
    from safetensors import SafetensorError, safe_open

    single = transformer_path if transformer_path and Path(transformer_path).is_file() else None
    folder = Path(transformer_path) if transformer_path and not single else Path(model_path) / "transformer"
    if single and Path(single).suffix != ".safetensors":
        return None
    held = folder_weight_files(folder)
    if held is None:
        return None
    source = WeightSource({key: (path, key) for key, path in held.items()}, origin=str(folder))
    if single:
        try:
            with safe_open(single, framework="pt", device="cpu") as handle:
                keys = list(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{single}: not a readable safetensors file ({exc})") from None
        names = file_names(keys, source.files, single)
        source.files.update({name: (Path(single), key) for key, name in names.items()})
    return source


def check_names(source: WeightSource, transformer: torch.nn.Module) -> None:
    """The weights must hold exactly the model's tensors: a tensor it does not have (an fp8 file's ``weight_scale``,
    another model's layer) would be ignored and one it lacks never filled. Refused in one line naming them, as a
    ``--transformer_path`` file with such tensors is."""
    own = set(transformer.state_dict())
    unknown = sorted(set(source.files) - own)
    missing = sorted(own - set(source.files))
    if unknown:
        hint = (
            " (a scaled fp8 checkpoint? give the bf16 weights; --base_weight_dtype quantises them)"
            if any(n.endswith(("_scale", ".scale_weight", ".input_scale")) for n in unknown)
            else " (another model's weights?)"
        )
        raise UserError(
            f"{source.origin}: {len(unknown)} tensor(s) the transformer does not have, e.g. {unknown[:3]}{hint}"
        )
    if missing:
        raise UserError(f"{source.origin}: {len(missing)} tensor(s) of the transformer missing, e.g. {missing[:3]}")


def build_empty(cls, config_folder: str, dtype: torch.dtype):
    """The transformer (of the family's class ``cls``) with its parameters on ``meta`` in ``dtype``: shapes only,
    no memory."""
    from accelerate import init_empty_weights

    config = cls.load_config(config_folder)
    with init_empty_weights():  # parameters on meta; tensors built in __init__ (the RoPE table) stay real
        transformer = cls.from_config(config)
    return torch.nn.Module.to(transformer, dtype)  # PyTorch's cast (diffusers' warns on every cast)


def lora_init(transformer: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A new adapter's values, from ``seed`` and each parameter's name alone (PEFT's "gaussian" init: A ~ N(0, 1/r),
    B = 0): the same on every rank, device and mode, computed from shapes (the model may be on ``meta``)."""
    values = {}
    for name, param in transformer.named_parameters():
        if ".lora_A." in name:
            generator = torch.Generator().manual_seed((seed & 0xFFFFFFFF) * 0x9E3779B1 ^ zlib.crc32(name.encode()))
            rank = param.shape[0]
            values[name] = torch.randn(tuple(param.shape), generator=generator) / rank
        elif ".lora_B." in name:
            values[name] = torch.zeros(tuple(param.shape))
    return values


def shard_rows(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """(the tensor this rank writes, the rows of the full parameter it holds — None: all of it). FSDP2 shards dim 0
    as ``torch.chunk`` does: ceil(rows / ranks) each, the last ones shorter or empty."""
    if not hasattr(param, "to_local"):
        return param, None
    local = param.to_local()
    rows, ranks = param.shape[0], param.device_mesh.size()
    chunk = math.ceil(rows / ranks)
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    if local.shape[0] != stop - start:
        raise RuntimeError(f"shard of {tuple(param.shape)} has {local.shape[0]} rows, expected {stop - start}")
    return local, (start, stop)


@torch.no_grad()
def allocate(module: torch.nn.Module, device) -> None:
    """``module.to_empty(device)`` that keeps the buffers built in ``__init__`` (``init_empty_weights`` leaves them
    real: a RoPE table, Qwen-Image 2.1's timestep frequencies): ``to_empty`` would leave them uninitialised memory,
    and no weight file holds the non-persistent ones."""
    kept = {name: buffer.detach().clone() for name, buffer in module.named_buffers() if not buffer.is_meta}
    module.to_empty(device=device)
    for name, buffer in module.named_buffers():
        if name in kept:
            buffer.copy_(kept[name])


@torch.no_grad()
def fill(module: torch.nn.Module, source: WeightSource, prefix: str = "") -> int:
    """Every parameter of ``module`` (allocated, on any device, sharded or not) from ``source``; returns the bytes
    read. Each tensor is read (its rows only when sharded), converted and copied before the next is read."""
    read = 0
    for name, param in module.named_parameters():
        local, rows = shard_rows(param)
        value = source.value(prefix + name, rows)
        if tuple(value.shape) != tuple(local.shape):
            raise UserError(
                f"{prefix + name}: the weights hold shape {tuple(value.shape)}, the model {tuple(local.shape)} "
                "(another model size?)"
            )
        local.copy_(value)
        read += value.numel() * value.element_size()
    return read


def materialize_blocks(transformer: torch.nn.Module, source: WeightSource, device: torch.device, quantize=None) -> None:
    """One process or DDP: each block (then the rest of the model) allocated on the CPU, filled, quantised when asked
    (``quantize(block)``), and moved to ``device`` before the next: host memory holds one block at a time."""
    blocks = transformer.transformer_blocks
    for index, block in enumerate(blocks):
        allocate(block, "cpu")
        fill(block, source, f"transformer_blocks.{index}.")
        if quantize is not None:
            quantize(block)
        block.to(device)
    for name, child in transformer.named_children():
        if child is blocks:
            continue
        allocate(child, "cpu")
        fill(child, source, f"{name}.")
        child.to(device)
    source.handles.clear()  # the files are closed once the model is filled
