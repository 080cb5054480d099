"""Where and in which dtype an encoder runs: ``auto`` is this rank's GPU in bf16, else the CPU in fp32."""

from __future__ import annotations

import torch

from pipeline.common.process_group import distributed_env


def resolve_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", distributed_env().local_rank)
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def load_text_encoder(cls, model_path, device: str = "auto", dtype: str = "auto"):
    """A VLM text encoder (``cls``: its transformers class) from ``model_path/text_encoder``, frozen, on ``device`` in
    ``dtype`` (both resolved); returns (model, device, dtype, hidden size, pad token id)."""
    where = resolve_device(device)
    compute = resolve_dtype(dtype, where)
    model = cls.from_pretrained(str(model_path), subfolder="text_encoder", dtype=compute).to(where)
    model.eval().requires_grad_(False)
    text = model.config.text_config
    return model, where, compute, int(text.hidden_size), int(text.pad_token_id or 0)
