"""A frozen fp8 base for LoRA (``--base_weight_dtype float8_e4m3fn``): half the bf16 base's memory.

Every ``nn.Linear`` of the transformer blocks that does not train keeps its weight as
float8 (e4m3) with one fp32 scale per output channel (the row's largest magnitude maps
to e4m3's largest value, 448), and computes in bf16: the weight is dequantised for
the one matmul that needs it and dropped again.  Backward saves the fp8 weight and
its scales, not a bf16 copy, and dequantises again for the input's gradient (the
weight itself gets none).  The LoRA adapters, biases, norms and the layers outside
the blocks (embeddings, the output projection) stay as they are.

Why a small module rather than a library: torchao's float8 paths target training
fp8 matmuls on recent GPUs (and their CPU support varies by version); this needs only
weight storage, which two lines of PyTorch do on every device, so the CPU tests run
the exact code a GPU runs.  A ~20B base takes ~20 GB instead of ~41 GB.
"""

from __future__ import annotations

import torch

from pipeline.train.config.model import FP8_FORMATS

FP8_DTYPES = {name: getattr(torch, name) for name in FP8_FORMATS}


class _DequantizedLinear(torch.autograd.Function):
    """``x @ (w8 · scale)ᵀ + bias`` in ``dtype``; saves the fp8 weight, not its bf16 copy."""

    @staticmethod
    def forward(ctx, x, weight8, scale, bias, dtype):
        weight = weight8.to(dtype) * scale.to(dtype)
        ctx.save_for_backward(weight8, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return torch.nn.functional.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_output):
        weight8, scale = ctx.saved_tensors
        weight = weight8.to(ctx.dtype) * scale.to(ctx.dtype)
        grad_x = grad_output.to(ctx.dtype) @ weight
        return grad_x.to(ctx.x_dtype), None, None, None, None


class Float8Linear(torch.nn.Module):
    """A frozen Linear whose weight is stored in fp8 with per-output-channel scales, computed in ``compute_dtype``."""

    def __init__(self, linear: torch.nn.Linear, fp8_dtype: torch.dtype = torch.float8_e4m3fn):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype if linear.weight.dtype.itemsize >= 2 else torch.bfloat16
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / torch.finfo(fp8_dtype).max
        self.register_buffer("weight8", (weight / scale).to(fp8_dtype))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (for code that reads ``.weight``; the forward never builds it whole twice)."""
        return self.weight8.to(self.compute_dtype) * self.scale.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedLinear.apply(x, self.weight8, self.scale, self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight8.dtype}"


def quantize_frozen_linears(transformer: torch.nn.Module, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> int:
    """Replace every frozen ``nn.Linear`` inside the transformer blocks (LoRA's base layers included, its A/B not)
    by a :class:`Float8Linear`; returns how many. Call after the adapter is added."""
    return sum(quantize_block(block, fp8_dtype) for block in transformer.transformer_blocks)


def quantize_block(block: torch.nn.Module, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> int:
    """:func:`quantize_frozen_linears` for one block (the loader quantises each block as it fills it)."""
    replaced = 0
    for name, module in list(block.named_modules()):
        if type(module) is not torch.nn.Linear or module.weight.requires_grad or "lora_" in name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, child, Float8Linear(module, fp8_dtype))
        replaced += 1
    return replaced
