"""The options for smaller cards, on the tiny model: 8-bit AdamW, an fp8 frozen base, FSDP's CPU offload."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FSDP_REFERENCE
from helpers import TRAIN_BASE as BASE
from helpers import run_module, train, transformer_weights
from safetensors.torch import load_file


@pytest.mark.slow
def test_8bit_adam_trains_a_lora_resumes_bitwise_and_is_refused_under_fsdp(tiny_model_dir, edit_meta, tmp_path):
    """--use_8bit_adam (bitsandbytes AdamW8bit, on the CPU here): its nested 8-bit state round-trips through the
    checkpoint files exactly; under FSDP it is refused at start-up (its kernels take no DTensor)."""
    import shutil

    # rank 64: the tiny model's adapter matrices reach bitsandbytes' 4,096-element threshold for 8-bit states
    flags = ["--use_peft_lora", "--lora_rank", "64", "--use_8bit_adam", "--learning_rate", "1e-2"]
    flags += ["--checkpointing_steps", "2", "--max_train_steps", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_model_dir, edit_meta, straight, *flags)
    state = load_file(str(straight / "checkpoint-2" / "optimizer.safetensors"))
    assert any(v.dtype == torch.uint8 for v in state.values()), "8-bit moments in the checkpoint"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train(tiny_model_dir, edit_meta, resumed, *flags, "--resume_from_checkpoint", "latest")
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "8-bit AdamW resume is not exact"
    refused = run_module(
        "pipeline.train", "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_meta_dir",
        str(edit_meta), "--output_dir", str(tmp_path / "fsdp"), *BASE, *flags, "--parallelism", "fsdp",
    )  # fmt: skip
    assert refused.returncode == 2 and "--use_8bit_adam works with DDP or one process" in refused.stderr


@pytest.mark.slow
def test_a_lora_trains_on_an_fp8_base_and_exports_like_on_bf16(tiny_model_dir, edit_meta, tmp_path):
    """--base_weight_dtype float8_e4m3fn: the adapter trains, resumes, and its files are what a bf16 base gives
    (same keys, shapes, dtypes; they load in diffusers); FSDP is refused."""
    import math

    flags = ["--use_peft_lora", "--lora_rank", "4", "--learning_rate", "1e-2", "--mixed_precision", "bf16"]
    flags += ["--max_train_steps", "4", "--checkpointing_steps", "2"]
    files = {}
    for dtype in ("auto", "float8_e4m3fn"):
        out = tmp_path / dtype
        result = train(tiny_model_dir, edit_meta, out, *flags, "--base_weight_dtype", dtype)
        files[dtype] = load_file(str(out / "pytorch_lora_weights.safetensors"))
        summary = json.loads((out / "run_summary.json").read_text())
        assert all(math.isfinite(x) for x in summary["final_loss"])
    assert "stored as float8_e4m3fn" in result.stderr
    bf16, fp8 = files["auto"], files["float8_e4m3fn"]
    assert bf16.keys() == fp8.keys()
    assert all(bf16[k].shape == fp8[k].shape and bf16[k].dtype == fp8[k].dtype for k in bf16)
    assert any(float(v.abs().max()) > 0 for k, v in fp8.items() if "lora_B" in k), "the adapter trained"
    from diffusers import QwenImageEditPlusPipeline

    QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir).load_lora_weights(
        str(tmp_path / "float8_e4m3fn" / "pytorch_lora_weights.safetensors")
    )
    refused = run_module(
        "pipeline.train", "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_meta_dir",
        str(edit_meta), "--output_dir", str(tmp_path / "fsdp"), *BASE, *flags, "--base_weight_dtype",
        "float8_e4m3fn", "--parallelism", "fsdp",
    )  # fmt: skip
    assert refused.returncode == 2 and "not FSDP" in refused.stderr


@pytest.mark.slow
def test_fsdp_cpu_offload_trains_what_fsdp_trains_and_resumes(tiny_model_dir, edit_meta, fsdp_reference, tmp_path):
    """--fsdp_cpu_offload (FSDP2's CPUOffloadPolicy) on 2 gloo processes: the wiring GPUs use. On a CPU the shards
    stay where they are, so the weights equal plain FSDP's bit for bit; offload without FSDP is refused."""
    import shutil

    common = FSDP_REFERENCE  # plain FSDP's run is the session's fsdp_reference
    train(tiny_model_dir, edit_meta, tmp_path / "offload", *common, "--fsdp_cpu_offload", nproc=2)
    a = transformer_weights(fsdp_reference / "transformer")
    b = transformer_weights(tmp_path / "offload" / "transformer")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "offload" / "checkpoint-3", resumed / "checkpoint-3")
    train(
        tiny_model_dir, edit_meta, resumed, *common, "--fsdp_cpu_offload", "--resume_from_checkpoint", "latest", nproc=2
    )
    c = transformer_weights(resumed / "transformer")
    assert all(torch.equal(a[k], c[k]) for k in a), "offloaded FSDP resumes exactly"
    refused = run_module(
        "pipeline.train", "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_meta_dir",
        str(edit_meta), "--output_dir", str(tmp_path / "ddp"), *BASE, "--max_train_steps", "1", "--fsdp_cpu_offload",
    )  # fmt: skip
    assert refused.returncode == 2 and "add --parallelism fsdp" in refused.stderr
