"""Qwen-Image-Edit's training forward: 2×2-patch packing, the target's tokens first and every source's after them,
``img_shapes`` target-first, the prediction the first target-length rows, and the text limit of its RoPE table."""

from __future__ import annotations

from typing import Any

import torch

ROPE_POSITIONS = 4096  # positions of the QwenImage transformer's RoPE table (diffusers' QwenEmbedRope)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)(W/2), 4C]: 2×2 patches, as the Qwen-Image transformer takes them."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def img_shapes(target_latents: torch.Tensor, source_latents: list[torch.Tensor]) -> list[list[tuple[int, int, int]]]:
    """Per sample: the target's then each source's (frames, h/2, w/2) packed grid."""
    shapes = [(1, lat.shape[-2] // 2, lat.shape[-1] // 2) for lat in (target_latents, *source_latents)]
    return [shapes] * target_latents.shape[0]


def predict(
    transformer,
    noisy_target: torch.Tensor,
    target_latents: torch.Tensor,
    source_latents: list[torch.Tensor],
    batch: dict[str, Any],
    timestep: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """What ``QwenImageEditPlusPipeline``'s denoising loop calls: the noisy target's tokens, then every source's;
    the prediction is the first target-length rows of the output."""
    hidden = torch.cat([noisy_target, *[pack_latents(s) for s in source_latents]], dim=1)
    pred = transformer(
        hidden_states=hidden.to(device, dtype),
        timestep=timestep.to(device, dtype),
        encoder_hidden_states=batch["prompt_embeds"].to(device, dtype),
        encoder_hidden_states_mask=batch["prompt_mask"].to(device),
        img_shapes=img_shapes(target_latents, source_latents),
        return_dict=False,
    )[0]
    return pred[:, : noisy_target.shape[1]]


def text_positions(sizes: list[tuple[int, int]]) -> int:
    """How many prompt tokens the transformer can position next to images of these pixel sizes: its RoPE table
    less the largest image's half side in latent patches (16 px each), as diffusers' QwenEmbedRope (scale_rope)
    starts the text after them."""
    return ROPE_POSITIONS - max((max(w, h) // 16) // 2 for w, h in sizes)
