"""--base_weight_dtype float8_e4m3fn: the frozen base stored in fp8 (per-output-channel scales), computed in bf16."""

from __future__ import annotations

import math

import torch

from pipeline.train.engine.fp8 import Float8Linear

SPECIFIES = ("pipeline.train.engine.fp8",)

# e4m3 keeps 3 mantissa bits: a weight rounds to within half a step of 2^-3 of its binade, a relative error
# uniform in ±2^-4, whose rms is 2^-4/√3 = 3.6 %. A Linear's output sums many weight·input terms whose errors are
# independent, so its relative rms error is that same 3.6 % (weights far below their row's largest, which fall
# into e4m3's subnormals, only lower it: their error is absolute and tiny).
PER_LINEAR = 2**-4 / math.sqrt(3)


def test_one_linear_is_within_e4m3s_rounding():
    torch.manual_seed(0)
    linear = torch.nn.Linear(3072, 1024).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(64, 3072, dtype=torch.bfloat16)
    q = Float8Linear(linear)
    assert q.weight8.dtype == torch.float8_e4m3fn and q.scale.shape == (1024, 1)
    expected, got = linear(x).float(), q(x).float()
    error = float((got - expected).norm() / expected.norm())
    assert error <= 1.1 * PER_LINEAR, error  # 10 %: the sample's rms over 64 × 1024 outputs is that close
    x.requires_grad_(True)
    q(x).sum().backward()  # the input's gradient through the dequantised weight; the weight gets none
    reference = torch.ones(64, 1024, dtype=torch.bfloat16) @ linear.weight
    assert float((x.grad.float() - reference.float()).norm() / reference.float().norm()) <= 1.1 * PER_LINEAR
