"""Models for training: load the transformer and VAE, choose what trains, LoRA, export for diffusers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.train.config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = (
    "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,"
    "txt_mlp.net.2,txt_mod.1"
)


def weight_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype frozen weights are loaded in: the compute dtype of the mixed precision mode."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no", torch.float32)


def training_dtypes(mixed_precision: str | None, lora: bool) -> tuple[torch.dtype, torch.dtype]:
    """(transformer load dtype, VAE dtype) for a mode.

    LoRA: the frozen base and the VAE in the compute dtype (a 20B DiT is ~41 GB in
    bf16, ~82 GB in fp32); the adapter is cast to fp32 after it is added.
    Full fine-tuning: fp32 master weights (optimizer updates of 1e-5 relative size
    vanish in bf16), bf16 compute through autocast (DDP) or FSDP's param dtype;
    the frozen VAE in the compute dtype.
    """
    frozen = weight_dtype(mixed_precision)
    return (frozen if lora else torch.float32), frozen


def load_transformer(model_path: str, transformer_path: str | None = None, dtype: torch.dtype = torch.float32):
    from diffusers import QwenImageTransformer2DModel

    if transformer_path:
        return QwenImageTransformer2DModel.from_pretrained(transformer_path, torch_dtype=dtype)
    return QwenImageTransformer2DModel.from_pretrained(model_path, subfolder="transformer", torch_dtype=dtype)


def load_vae(model_path: str, vae_path: str | None = None, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKLQwenImage

    vae = (
        AutoencoderKLQwenImage.from_pretrained(vae_path, torch_dtype=dtype)
        if vae_path
        else AutoencoderKLQwenImage.from_pretrained(model_path, subfolder="vae", torch_dtype=dtype)
    )
    return vae.eval().requires_grad_(False)


def load_scheduler(model_path: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(model_path, subfolder="scheduler")


def select_trainable(
    transformer: torch.nn.Module, modules: list[str], low_lr_modules: list[str]
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Full fine-tuning: parameters whose name contains a pattern train ("." matches all).

    Returns (normal-LR params, half-LR params); everything else is frozen.
    """
    normal, low = [], []
    for name, param in transformer.named_parameters():
        if any(p in name for p in low_lr_modules):
            param.requires_grad_(True)
            low.append(param)
        elif any(p in name for p in modules):
            param.requires_grad_(True)
            normal.append(param)
        else:
            param.requires_grad_(False)
    if not normal and not low:
        raise ValueError(f"no transformer parameter matches --trainable_modules {modules} / {low_lr_modules}")
    return normal, low


def add_lora(
    transformer, rank: int, alpha: float, dropout: float, targets: list[str], lora_path: str | None, seed: int = 0
):
    """Freeze the transformer and add a PEFT LoRA adapter (optionally initialised from a file).

    The random init is drawn from ``seed`` alone, so every rank (and every run of the
    same seed, under DDP or FSDP) starts from the same adapter.
    """
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    if lora_path:
        from diffusers import QwenImagePipeline

        state = QwenImagePipeline.lora_state_dict(lora_path)
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        result = set_peft_model_state_dict(transformer, state, adapter_name="default")
        if result is not None and getattr(result, "unexpected_keys", None):
            log.warning("unexpected keys in --lora_path: %s", result.unexpected_keys[:5])
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    for param in trainable:  # adapters train in fp32 whatever the base dtype
        param.data = param.data.float()
    return trainable


def trainable_state(transformer) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (what checkpoints hold)."""
    return {n: p.detach().cpu().contiguous() for n, p in transformer.named_parameters() if p.requires_grad}


def build_training_models(model: ModelConfig, mixed_precision: str | None, learning_rate: float, seed: int = 0):
    """(transformer in train mode, frozen VAE, scheduler, optimizer parameter groups) for a mode, on the CPU.

    The caller moves them to the device (or shards them); dtypes follow :func:`training_dtypes`.
    """
    transformer_dtype, vae_dtype = training_dtypes(mixed_precision, model.lora is not None)
    transformer = load_transformer(model.pretrained, model.transformer_path, transformer_dtype)
    vae = load_vae(model.pretrained, model.vae_path, vae_dtype)
    scheduler = load_scheduler(model.pretrained)
    if model.lora is not None:
        lora = model.lora
        params = add_lora(
            transformer, lora.rank, lora.alpha, lora.dropout, list(lora.target_modules), lora.init_path, seed
        )
        groups = [{"params": params, "lr": learning_rate}]
    else:
        normal, low = select_trainable(transformer, list(model.trainable_modules), list(model.low_lr_modules))
        groups = [{"params": normal, "lr": learning_rate}]
        if low:
            groups.append({"params": low, "lr": learning_rate / 2})
    if model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()  # diffusers returns models in eval mode: LoRA dropout would do nothing
    return transformer, vae, scheduler, [g for g in groups if g["params"]]


def export_transformer(transformer, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Full fine-tune → a diffusers ``transformer/`` folder (safetensors).

    ``state``: the full weights gathered from FSDP shards; they go into a copy of the
    model built on the ``meta`` device, so no second full model is allocated.
    """
    out = Path(out_dir) / "transformer"
    if state is not None:
        with torch.device("meta"):
            plain = type(transformer).from_config(transformer.config)
        plain.load_state_dict(state, assign=True)
        transformer = plain
    transformer.save_pretrained(out, safe_serialization=True)
    return out


def export_lora(transformer, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """LoRA → ``pytorch_lora_weights.safetensors`` that ``QwenImageEditPlusPipeline.load_lora_weights`` accepts.

    ``state``: the adapter weights gathered from FSDP shards.
    """
    from diffusers import QwenImagePipeline
    from peft.utils import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(transformer, state_dict=state)
    QwenImagePipeline.save_lora_weights(out, transformer_lora_layers=layers)
    return out / "pytorch_lora_weights.safetensors"
