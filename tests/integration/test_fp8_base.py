"""--base_weight_dtype float8_e4m3fn: the frozen base stored in fp8 (per-output-channel scales), computed in bf16."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.engine.fp8 import Float8Linear, quantize_frozen_linears

# e4m3 keeps 3 mantissa bits: a weight rounds to within half a step of 2^-3 of its binade, a relative error
# uniform in ±2^-4, whose rms is 2^-4/√3 = 3.6 %. A Linear's output sums many weight·input terms whose errors are
# independent, so its relative rms error is that same 3.6 % (weights far below their row's largest, which fall
# into e4m3's subnormals, only lower it: their error is absolute and tiny).


@pytest.mark.slow
def test_a_real_width_block_in_fp8_stays_close_to_bf16_and_saves_half_the_bytes():
    """The published block (3072 wide) with LoRA r64: its update of the image and text streams in fp8 vs bf16.
    Bound: 14 quantised Linears, the longest path through the block meets about 6 of them (modulation, q/k/v,
    out, MLP in and out); independent errors add in quadrature: √6 × 3.6 % = 8.8 %, and the attention's softmax
    can sharpen logit errors a little — so 15 %."""
    from pipeline.families.qwen_edit import DEFAULT_LORA_TARGETS
    from pipeline.families.qwen_edit import QWEN_IMAGE_EDIT_2509_TRANSFORMER as CONFIG
    from pipeline.train.engine.activations import ActivationMode, build_one_block

    model = build_one_block(CONFIG, ActivationMode(lora_rank=64, lora_targets=DEFAULT_LORA_TARGETS))
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 256, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 64, 3584, generator=g),
        encoder_hidden_states_mask=torch.ones(1, 64, dtype=torch.long),
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, 16, 16)]],
        return_dict=False,
    )
    block, seen = model.transformer_blocks[0], {}

    def keep_in(module, args, kwargs):
        seen["in"] = [kwargs["encoder_hidden_states"].float(), kwargs["hidden_states"].float()]

    def keep_out(module, args, output):
        seen["out"] = [t.float() for t in output]

    block.register_forward_pre_hook(keep_in, with_kwargs=True)
    block.register_forward_hook(keep_out)

    def updates():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(**inputs)
        return [out - inp for out, inp in zip(seen["out"], seen["in"], strict=True)]

    bf16_bytes = sum(
        m.weight.numel() * 2 for m in block.modules() if type(m) is torch.nn.Linear and "lora" not in str(m)
    )
    reference = updates()
    assert quantize_frozen_linears(model) == 14
    fp8_bytes = sum(m.weight8.numel() + m.scale.numel() * 4 for m in block.modules() if isinstance(m, Float8Linear))
    for expected, got in zip(reference, updates(), strict=True):
        assert float((got - expected).norm() / expected.norm()) <= 0.15
    assert fp8_bytes <= 0.51 * bf16_bytes, "one byte a weight and a scale per row"
