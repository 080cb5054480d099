"""Qwen-Image 2.1's training forward, as ``QwenImage21Pipeline``'s denoising loop calls the transformer: flat
packing (one token per 16×16 pixels), the conditions' tokens first and the noisy target's last, ``img_mask`` = the
prompt's slot mask with the target's slots appended, the prediction the last target-length rows, and the prompt
rebuilt from what a v2 sample stores (its text rows and its slot layout)."""

from __future__ import annotations

from typing import Any

import torch

TOKENS_PER_SLOT = 4  # one <|image_pad|> row of the prompt stands for 2×2 latent tokens


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H·W, C]: 2.1 takes latents unpatched."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).transpose(1, 2)


def full_prompt(rows: torch.Tensor, slots: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings ``[L, D]``, slot mask ``[L]``) of the whole post-drop sequence from a sample's text rows and its
    slots ``[[position, h32, w32], …]``: each slot block is ``h32·w32`` rows at ``position``; the transformer
    overwrites those rows with the condition's latents, so they are zeros here."""
    length = rows.shape[0] + sum(h * w for _, h, w in slots)
    mask = torch.zeros(length, dtype=torch.bool)
    for position, h, w in slots:
        mask[position : position + h * w] = True
    full = rows.new_zeros(length, rows.shape[1])
    full[~mask] = rows
    return full, mask


def text_rows(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows a v2 sample stores: the ones that are not image slots, in order."""
    return embeddings[~mask]


def img_shapes(target_latents: torch.Tensor, source_latents: list[torch.Tensor]) -> list[list[tuple[int, int, int]]]:
    """Per sample: each condition's then the target's (frames, h, w) latent grid (conditions first)."""
    shapes = [(1, lat.shape[-2], lat.shape[-1]) for lat in (*source_latents, target_latents)]
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
    """The transformer's prediction for the noisy target's tokens; ``batch`` carries ``prompt_embeds`` and
    ``image_pad_mask`` (one layout for every row: the transformer reads row 0's)."""
    hidden = torch.cat([*[pack_latents(s) for s in source_latents], noisy_target], dim=1)
    pad_mask = batch["image_pad_mask"]
    img_mask = torch.cat([pad_mask, pad_mask.new_ones(pad_mask.shape[0], noisy_target.shape[1] // TOKENS_PER_SLOT)], 1)
    mask = batch.get("prompt_mask")
    pred = transformer(
        hidden_states=hidden.to(device, dtype),
        timestep=timestep.to(device, dtype),
        encoder_hidden_states=batch["prompt_embeds"].to(device, dtype),
        encoder_hidden_states_mask=None if mask is None or bool(mask.all()) else mask.to(device),
        img_shapes=img_shapes(target_latents, source_latents),
        img_mask=img_mask.to(device),
        return_dict=False,
    )[0]
    return pred[:, -noisy_target.shape[1] :]
