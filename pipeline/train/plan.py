"""``--plan``: what a training mode needs per GPU, computed from the model's config on the ``meta`` device.

Nothing is allocated and no weights or data are read: the transformer and the VAE
are built on ``meta`` from their ``config.json`` (or from the published
Qwen-Image-Edit-2509 config below), which gives exact parameter counts; bytes per
parameter follow the dtypes of :func:`pipeline.train.model.training_dtypes`.

Activations are an estimate (per block and token: ~34·d bytes in bf16 without
gradient checkpointing, after Korthikanti et al. 2022 with fused attention; the
block inputs plus one recomputed block with it); the VAE's transient encode
buffers, the CUDA context and allocator fragmentation are not counted, which is
why ``fits`` keeps a 10 % margin.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

GiB = 1024**3

# transformer/config.json of Qwen/Qwen-Image-Edit-2509 (as published; written here, not downloaded)
QWEN_IMAGE_EDIT_2509_TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
PUBLISHED = {"qwen-image-edit-2509": QWEN_IMAGE_EDIT_2509_TRANSFORMER}
MARGIN = 0.9  # share of the card the plan may use


@dataclass(frozen=True)
class PlanRequest:
    lora: bool
    lora_rank: int = 32
    lora_targets: tuple[str, ...] = ()
    trainable_modules: tuple[str, ...] = (".",)
    fsdp: bool = False
    processes: int = 1
    mixed_precision: str | None = "bf16"
    gradient_checkpointing: bool = False
    batch_size: int = 1
    image_sample_size: int = 512
    num_sources: int = 1
    text_tokens: int = 512
    optimizer_bytes_per_param: int = 8  # AdamW: two fp32 moments (8-bit Adam: 2)
    gpu_memory_gib: float = 80.0


def build_on_meta(transformer_config: dict, vae_config: dict | None = None):
    """The transformer (and VAE) from their configs, on ``meta``: shapes and counts, no memory."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    config = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(config)
        vae = AutoencoderKLQwenImage.from_config(vae_config) if vae_config else AutoencoderKLQwenImage()
    return transformer, vae


def lora_parameters(transformer: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """Adapter size: rank × (in + out) for every Linear PEFT would match (name equal to or ending in a target)."""
    total = 0
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def memory_plan(transformer: torch.nn.Module, vae: torch.nn.Module, req: PlanRequest) -> dict:
    """Bytes per GPU by kind, and whether the total fits ``gpu_memory_gib`` with a 10 % margin."""
    from pipeline.train.model import training_dtypes

    params = sum(p.numel() for p in transformer.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in transformer.transformer_blocks)
    blocks = len(transformer.transformer_blocks)
    base_dtype, vae_dtype = training_dtypes(req.mixed_precision, req.lora)
    size = torch.empty(0, dtype=base_dtype).element_size()
    compute = 2 if req.mixed_precision in ("bf16", "fp16") else 4
    shards = req.processes if req.fsdp else 1
    if req.lora:
        trainable = lora_parameters(transformer, req.lora_rank, req.lora_targets)
        weights = params * size / shards + trainable * 4
    else:
        names = [n for n, _ in transformer.named_parameters()]
        counts = dict((n, p.numel()) for n, p in transformer.named_parameters())
        trainable = sum(counts[n] for n in names if any(t in n for t in req.trainable_modules))
        weights = params * 4 / shards
    if req.fsdp:  # one block gathered in the compute dtype for forward, one prefetched
        weights += 2 * block * compute
    grads = trainable * 4 / shards
    if req.fsdp:
        grads += block * 4  # one block's unsharded gradients before the reduce-scatter
    elif req.processes > 1:
        grads *= 2  # DDP's reducer buckets hold a second copy
    optimizer = trainable * req.optimizer_bytes_per_param / shards
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    image_tokens = (req.image_sample_size // 16) ** 2
    tokens = image_tokens * (1 + req.num_sources) + req.text_tokens
    per_block = 34 * tokens * req.batch_size * hidden * compute / 2
    if req.gradient_checkpointing:
        activations = blocks * tokens * req.batch_size * hidden * compute + per_block
    else:
        activations = blocks * per_block
    vae_bytes = sum(p.numel() for p in vae.parameters()) * torch.empty(0, dtype=vae_dtype).element_size()
    total = weights + grads + optimizer + activations + vae_bytes
    return {
        "request": asdict(req),
        "transformer_parameters": params,
        "trainable_parameters": trainable,
        "tokens_per_sample": tokens,
        "gib_per_gpu": {
            "weights": weights / GiB,
            "gradients": grads / GiB,
            "optimizer": optimizer / GiB,
            "activations_estimate": activations / GiB,
            "vae": vae_bytes / GiB,
            "total": total / GiB,
        },
        "fits": total <= MARGIN * req.gpu_memory_gib * GiB,
    }


def format_plan(plan: dict) -> str:
    req, gib = plan["request"], plan["gib_per_gpu"]
    mode = f"{'LoRA r' + str(req['lora_rank']) if req['lora'] else 'full'}, {'FSDP' if req['fsdp'] else 'DDP'}"
    head = (
        f"memory plan per GPU: {mode} over {req['processes']} process(es), mixed precision "
        f"{req['mixed_precision'] or 'no'}, gradient checkpointing {'on' if req['gradient_checkpointing'] else 'off'}, "
        f"batch {req['batch_size']} × {plan['tokens_per_sample']} tokens ({req['image_sample_size']} px, "
        f"{req['num_sources']} source(s), {req['text_tokens']} text tokens)"
    )
    lines = [head, f"  transformer parameters {plan['transformer_parameters'] / 1e9:.2f} B, trainable "
             f"{plan['trainable_parameters'] / 1e6:.1f} M"]  # fmt: skip
    for key, value in gib.items():
        lines.append(f"  {key:<22} {value:8.1f} GiB")
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"  → {verdict} in {req['gpu_memory_gib']:g} GiB (with a 10 % margin)")
    return "\n".join(lines)


def read_configs(model: str) -> tuple[dict, dict | None]:
    """(transformer config, VAE config) of a diffusers folder, or of a published model by name."""
    if model in PUBLISHED:
        return PUBLISHED[model], None
    root = Path(model)
    transformer = json.loads((root / "transformer" / "config.json").read_text())
    vae_file = root / "vae" / "config.json"
    return transformer, (json.loads(vae_file.read_text()) if vae_file.is_file() else None)
