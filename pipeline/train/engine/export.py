"""The trained weights in the files diffusers (and ComfyUI, for a LoRA) load: at the end and in every checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.train.config.model import LoraConfig
from pipeline.train.engine import model as models
from pipeline.train.engine import parallel


def export_weights(
    transformer: torch.nn.Module,
    lora: LoraConfig | None,
    out_dir: str | Path,
    fsdp_trainable: list[str] | None,
    is_main: bool,
    family=None,
) -> dict[str, str]:
    """Collective under FSDP (``fsdp_trainable``: the trained parameters' names, gathered from the shards); the
    files are written by the main process, which gets ``{kind: path}``; the other ranks get ``{}``."""
    state = None
    if fsdp_trainable is not None:
        state = parallel.gather_full_state(transformer, fsdp_trainable if lora is not None else None)
    if not is_main:
        return {}
    if lora is not None:
        written = models.export_lora(transformer, out_dir, state, lora.export_format, family)
        return {f"lora_{kind}": path for kind, path in written.items()}
    return {"transformer": str(models.export_transformer(transformer, out_dir, state))}
