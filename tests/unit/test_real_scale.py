"""What breaks on GPUs, caught on a CPU machine.

Device placement: the models live on the ``meta`` device while the batch arrives on the
CPU, as it does from the DataLoader; every op that mixes the two raises, as CUDA does.
Dtypes: what each training mode loads in. Checkpoints: resume and prune cannot poison a run.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pipeline.train.config.model import FlowConfig, LoraConfig, ModelConfig

SPECIFIES = (
    "pipeline.families.qwen_edit.encoder",
    "pipeline.train.engine.activations",
    "pipeline.train.engine.plan",
)

HIDDEN_STATES_OF = "last_hidden_state"


def tiny_configs(model_dir):
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    return (
        QwenImageTransformer2DModel.load_config(model_dir, subfolder="transformer"),
        AutoencoderKLQwenImage.load_config(model_dir, subfolder="vae"),
    )


def models_on_meta(model_dir):
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    transformer_config, vae_config = tiny_configs(model_dir)
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(transformer_config)
        vae = AutoencoderKLQwenImage.from_config(vae_config)
    return transformer.train(), vae.eval().requires_grad_(False)


def cpu_batch(joint_dim: int, sources: int = 1, batch: int = 2, side: int = 64) -> dict:
    """A batch as the DataLoader delivers it: every tensor on the CPU."""
    return {
        "target": torch.rand(batch, 3, side, side) * 2 - 1,
        "sources": [torch.rand(batch, 3, side, side) * 2 - 1 for _ in range(sources)],
        "prompt_embeds": torch.randn(batch, 12, joint_dim).bfloat16(),
        "prompt_mask": torch.ones(batch, 12, dtype=torch.long),
    }


@pytest.mark.parametrize("sources", [0, 1, 3])
def test_a_whole_training_step_runs_with_the_models_on_another_device(tiny_model_dir, sources):
    from pipeline.train.engine.model import load_scheduler
    from pipeline.train.engine.step import batch_loss

    transformer, vae = models_on_meta(tiny_model_dir)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-4)
    batch = cpu_batch(transformer.config.joint_attention_dim, sources)
    loss = batch_loss(batch, transformer, vae, load_scheduler(str(tiny_model_dir)), FlowConfig(), 0, 1, 0)
    assert loss.device.type == "meta" and loss.dim() == 0
    loss.backward()
    grads = [p.grad for p in transformer.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "meta" for g in grads)
    optimizer.step()


class DeviceCheckingVLM(torch.nn.Module):
    """Stands in for Qwen2.5-VL's language model on the ``meta`` device (its vision tower reads grid values,
    which meta tensors do not have): it refuses any input that is not on its device."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(1, hidden, device="meta")
        self.seen: list[str] = []

    def forward(self, **inputs):
        for name, value in inputs.items():
            if torch.is_tensor(value):
                if value.device.type != "meta":
                    raise RuntimeError(f"{name} arrived on {value.device}, the model is on meta")
                self.seen.append(name)
        ids = inputs["input_ids"]
        return SimpleNamespace(**{HIDDEN_STATES_OF: self.proj(ids.unsqueeze(-1).float())})


def encoder_on_meta(model_dir):
    from pipeline.families.qwen_edit.encoder import PromptEncoder

    encoder = PromptEncoder.__new__(PromptEncoder)
    encoder.device, encoder.dtype, encoder.hidden_size, encoder.pad_token_id = (
        torch.device("meta"),
        torch.float32,
        32,
        0,
    )
    encoder.model = SimpleNamespace(model=DeviceCheckingVLM(encoder.hidden_size))
    return encoder


def test_extraction_encoder_call_moves_every_input_to_the_encoder_device(tiny_model_dir):
    from PIL import Image

    from pipeline.families.qwen_edit.encoder import PromptBuilder

    builder = PromptBuilder(str(tiny_model_dir))
    encoder = encoder_on_meta(tiny_model_dir)
    picture = builder.condition_images([Image.new("RGB", (80, 48), "red")], (80, 48))
    edit = builder.edit(picture, "make it blue")
    outputs = encoder.encode([edit, edit], builder.drop_index)
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"} <= set(encoder.model.model.seen)
    assert [o.device.type for o in outputs] == ["meta", "meta"]
    assert outputs[0].shape == (edit.length - builder.drop_index["edit"], encoder.hidden_size)


def test_sync_encoder_step_runs_with_the_models_on_another_device(tiny_model_dir):
    from PIL import Image

    from pipeline.families.qwen_edit.encoder import PromptBuilder
    from pipeline.train.engine.model import load_scheduler
    from pipeline.train.engine.step import batch_loss, encode_online

    transformer, vae = models_on_meta(tiny_model_dir)
    encoder = encoder_on_meta(tiny_model_dir)
    encoder.hidden_size = transformer.config.joint_attention_dim
    encoder.model.model = DeviceCheckingVLM(encoder.hidden_size)
    builder = PromptBuilder(str(tiny_model_dir))
    png = __import__("io").BytesIO()
    Image.new("RGB", (64, 64), "green").save(png, format="PNG")
    batch = cpu_batch(encoder.hidden_size, sources=1)
    del batch["prompt_embeds"], batch["prompt_mask"]
    batch["conditions"] = [
        {"kind": "edit", "images": [png.getvalue()], "target_size": [64, 64], "text": "paint it"},
        {"kind": "edit", "images": [png.getvalue()], "target_size": [64, 64], "text": ""},
    ]
    encode_online(batch, builder, encoder)
    assert batch["prompt_embeds"].device.type == "meta" and batch["prompt_mask"].device.type == "meta"
    loss = batch_loss(batch, transformer, vae, load_scheduler(str(tiny_model_dir)), FlowConfig(), 0, 1, 0)
    loss.backward()


# --- dtypes by mode ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mixed_precision, lora, base, vae",
    [
        ("bf16", True, torch.bfloat16, torch.bfloat16),
        ("bf16", False, torch.float32, torch.bfloat16),
        ("fp16", True, torch.float16, torch.float16),
        ("no", True, torch.float32, torch.float32),
        (None, False, torch.float32, torch.float32),
    ],
)
def test_weights_load_in_the_dtype_of_their_mode(tiny_model_dir, mixed_precision, lora, base, vae):
    from pipeline.train.engine.model import build_training_models

    model = ModelConfig(
        pretrained=str(tiny_model_dir),
        lora=LoraConfig(rank=4, alpha=2, dropout=0.1, target_modules=("to_q", "to_k")) if lora else None,
    )
    built = build_training_models(model, mixed_precision, 1e-4)
    transformer, vae_model, groups = built.transformer, built.vae, built.groups
    frozen = {p.dtype for p in transformer.parameters() if not p.requires_grad}
    trained = {p.dtype for g in groups for p in g["params"]}
    if lora:
        assert frozen == {base}, "the frozen base is in the compute dtype"
        assert trained == {torch.float32}, "the adapter trains in fp32"
    else:
        assert trained == {torch.float32}, "full fine-tuning keeps fp32 master weights"
    assert {p.dtype for p in vae_model.parameters()} == {vae}
    assert transformer.training, "train mode, so LoRA dropout acts"
    assert not vae_model.training


def test_mixed_precision_comes_from_accelerate_launch_unless_given(tiny_model_dir, monkeypatch, tmp_path):
    from accelerate.state import AcceleratorState

    from pipeline.train.cli import build_parser
    from pipeline.train.config import config_from_args
    from pipeline.train.engine.trainer import Trainer

    flags = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_meta_dir", str(tmp_path)]
    flags += ["--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", "--report_to", "none"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    try:
        for extra, expected in (([], "bf16"), (["--mixed_precision", "no"], "no")):
            AcceleratorState._reset_state(reset_partial_state=True)
            trainer = Trainer(config_from_args(build_parser().parse_args(flags + extra)))
            assert trainer.accelerator.mixed_precision == expected
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_loop_state_round_trips_through_json():
    from pipeline.train.engine.step import NonFinitePolicy

    policy = NonFinitePolicy(limit=5)
    policy.steps, policy.in_a_row = 3, 1
    state = json.loads(json.dumps(policy.state_dict()))
    assert state == {"nonfinite_steps": 3, "nonfinite_in_a_row": 1}  # the keys trainer_state.json has always had
    other = NonFinitePolicy(limit=5)
    other.load_state_dict({**state, "grad_norms": [1.5]})  # written by an older version: ignored
    assert other.steps == 3 and other.in_a_row == 1


# --- memory plan -------------------------------------------------------------------------------------


def test_the_published_config_has_the_published_size():
    from pipeline.families.qwen_edit import QWEN_IMAGE_EDIT_2509_TRANSFORMER
    from pipeline.train.engine.plan import build_on_meta

    transformer, vae = build_on_meta(QWEN_IMAGE_EDIT_2509_TRANSFORMER)
    params = sum(p.numel() for p in transformer.parameters())
    assert abs(params / 20.4e9 - 1) < 0.01, params  # "a 20B MMDiT": 20.43 B
    assert len(transformer.transformer_blocks) == 60 and transformer.config.joint_attention_dim == 3584
    assert all(p.device.type == "meta" for p in transformer.parameters()), "nothing allocated"
    assert 120e6 < sum(p.numel() for p in vae.parameters()) < 135e6


def test_plan_bytes_follow_the_mode():
    from pipeline.families.qwen_edit import QWEN_IMAGE_EDIT_2509_TRANSFORMER
    from pipeline.train.engine.activations import BlockActivations
    from pipeline.train.engine.plan import (
        GiB,
        PlanRequest,
        build_on_meta,
        memory_plan,
    )

    transformer, vae = build_on_meta(QWEN_IMAGE_EDIT_2509_TRANSFORMER)
    params = sum(p.numel() for p in transformer.parameters())
    targets = ("to_q", "to_k", "to_v")
    block = BlockActivations(54 * 3072, 54 * 3072, 16 << 20, 2 * 3072, 2 * 3072)  # counts as measured (see below)
    lora = memory_plan(transformer, vae, PlanRequest(lora=True, lora_rank=16, lora_targets=targets), block)
    adapter = lora["trainable_parameters"]
    assert adapter == 60 * 3 * 16 * (3072 + 3072), "rank × (in + out) per targeted Linear"
    assert lora["gib_per_gpu"]["weights"] == pytest.approx((params * 2 + adapter * 4) / GiB)
    assert lora["gib_per_gpu"]["optimizer"] == pytest.approx(adapter * 8 / GiB)
    tokens = (512 // 16) ** 2 * 2, 512
    assert lora["gib_per_gpu"]["activations"] == pytest.approx(60 * block.saved(*tokens) / GiB)
    assert lora["fits"]
    full = dict(lora=False, processes=8, gradient_checkpointing=True)
    fsdp = memory_plan(transformer, vae, PlanRequest(fsdp=True, **full), block)
    ddp = memory_plan(transformer, vae, PlanRequest(fsdp=False, **full), block)
    assert fsdp["gib_per_gpu"]["optimizer"] == pytest.approx(params * 8 / 8 / GiB), "sharded over 8"
    assert fsdp["fits"] and not ddp["fits"], "20B full fine-tuning needs FSDP on 80 GB cards"
    kept = 60 * (block.inputs(*tokens) + block.constant) + block.saved(*tokens) - block.constant
    assert fsdp["gib_per_gpu"]["activations"] == pytest.approx(kept / GiB), "inputs of every block, one recomputed"
    no_gc = memory_plan(transformer, vae, PlanRequest(fsdp=True, **{**full, "gradient_checkpointing": False}), block)
    assert no_gc["gib_per_gpu"]["activations"] > 5 * fsdp["gib_per_gpu"]["activations"]
    # fp8 base: the blocks' Linear weights at one byte (and a fp32 scale per output row) instead of two
    fp8 = memory_plan(
        transformer, vae, PlanRequest(lora=True, lora_rank=16, lora_targets=targets, base_weight_dtype="float8_e4m3fn"),
        block,
    )  # fmt: skip
    linears = [m for b in transformer.transformer_blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    saved = sum(m.weight.numel() - 4 * m.out_features for m in linears)
    assert lora["gib_per_gpu"]["weights"] - fp8["gib_per_gpu"]["weights"] == pytest.approx(saved / GiB)
    assert 18 < fp8["gib_per_gpu"]["weights"] < 22, "about 20 GB for the 20B DiT"
    # CPU offload: a GPU keeps the gathered blocks; shards, gradients and AdamW states go to the host
    off = memory_plan(transformer, vae, PlanRequest(fsdp=True, cpu_offload=True, **full), block)
    assert off["gib_per_gpu"]["optimizer"] == 0 and off["gib_per_gpu"]["weights"] < 2
    assert off["host_gib_per_process"] == pytest.approx(
        sum(fsdp["gib_per_gpu"][k] for k in ("weights", "gradients", "optimizer"))
        - off["gib_per_gpu"]["weights"]
        - off["gib_per_gpu"]["gradients"]
    )


def test_live_bytes_follow_what_is_alive_and_the_vae_encode_scales_with_its_mini_batch():
    from pipeline.families.qwen_edit import QWEN_IMAGE_EDIT_2509_TRANSFORMER
    from pipeline.train.engine.plan import LiveBytes, build_on_meta, vae_encode_peak

    counter = LiveBytes()
    with counter:
        a = torch.ones(1000, device="meta")  # 4,000 bytes
        b = a * 2  # 8,000 alive
        b.add_(1)  # in place: nothing new
        view = b.view(10, 100)  # a view: nothing new
        del a
        c = view + 1  # 8,000 alive again (a freed): the peak stays 8,000
        del b, view, c
    assert counter.peak == 8000 and counter.live == 0
    _, vae = build_on_meta(QWEN_IMAGE_EDIT_2509_TRANSFORMER)
    one, two = (vae_encode_peak(vae, n, 256, torch.bfloat16) for n in (1, 2))
    assert 1.9 < two / one <= 2.0, "the encode's tensors scale with the images encoded at once"
    from pipeline.train.engine.plan import vae_decode_peak

    small, large = vae_decode_peak(vae, 256, torch.bfloat16), vae_decode_peak(vae, 512, torch.bfloat16)
    assert 3.5 < large / small <= 4.0, "the decode's tensors scale with the picture's area"


def test_plan_cli_reads_only_the_config(tiny_model_dir, capsys):
    from pipeline.train.cli import main

    args = ["--plan", "--pretrained_model_name_or_path", str(tiny_model_dir), "--use_peft_lora", "--lora_rank", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "memory plan per GPU: LoRA r4, DDP over 1 process(es)" in out and "fits in 80 GiB" in out
    assert "which card" in out and any(line.split()[:3] == ["full", "8", "(FSDP)"] for line in out.splitlines())


def test_the_plan_knows_2511_and_counts_what_zero_cond_t_changes(tiny_2511_dir, capsys):
    """2511's zero_cond_t turns each image-stream modulation's shift, scale and gate into full [tokens, hidden]
    tensors (one row per sample before): the measured activations per image token must grow by at least the two
    modulations of the image stream each saving one such tensor, in at least 2-byte elements."""
    from pipeline.families.qwen_edit.tiny import SIZES, transformer_config
    from pipeline.train.cli import main
    from pipeline.train.engine.activations import ActivationMode, block_activations
    from pipeline.train.engine.plan import read_configs

    assert read_configs("qwen-image-edit-2511")[0]["zero_cond_t"] is True
    assert "zero_cond_t" not in read_configs("qwen-image-edit-2509")[0]
    mode = ActivationMode(lora_rank=4, lora_targets=("to_q", "to_k", "to_v"))
    size = SIZES["tiny"]
    old = block_activations(transformer_config(size, "2509"), mode)
    new = block_activations(transformer_config(size, "2511"), mode)
    hidden = size.dit_heads * size.dit_head_dim
    assert new.per_image_token - old.per_image_token >= 2 * hidden * 2
    args = ["--plan", "--pretrained_model_name_or_path", str(tiny_2511_dir), "--use_peft_lora", "--lora_rank", "4"]
    assert main(args) == 0
    assert "memory plan per GPU: LoRA r4" in capsys.readouterr().out
