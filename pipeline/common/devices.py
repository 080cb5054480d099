"""Where and in which dtype an encoder runs: ``auto`` is this rank's GPU in bf16, else the CPU in fp32."""

from __future__ import annotations

import torch

from pipeline.common.flags import distributed_env


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
