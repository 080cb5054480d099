"""Flow-matching training math: latents, timesteps, noisy input, loss.

Kept from the original tool, with one defect fixed: the noise/timestep generator
is seeded from (seed, rank, global step) — reproducible and resumable, and
different at every step (the original re-seeded it to the same value each step).
"""

from __future__ import annotations

import numpy as np
import torch

OUTLIER_THRESHOLD = 50.0  # prediction errors above this are left out of the loss


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latents mean and std as [1, C, 1, 1, 1]."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, mini_batch: int = 1) -> torch.Tensor:
    """[B, 3, H, W] pixels → normalised latents [B, C, H/8, W/8] (distribution mode, frozen VAE).

    Pixels come as uint8 from the loader (4× less to move between processes and to the
    device) and are scaled to [-1, 1] in fp32 on the VAE's device; float pixels in [-1, 1]
    are taken as they are.
    """
    mean, std = latent_stats(vae)
    outs = []
    step = max(1, mini_batch)
    for start in range(0, pixels.shape[0], step):
        chunk = pixels[start : start + step].to(vae.device)
        if chunk.dtype == torch.uint8:
            chunk = chunk.float().div_(127.5).sub_(1.0)
        chunk = chunk.to(vae.dtype).unsqueeze(2)
        outs.append(vae.encode(chunk).latent_dist.mode())
    latents = torch.cat(outs)
    latents = (latents - mean.to(latents)) / std.to(latents)
    return latents[:, :, 0]


def shift_mu(image_seq_len: int, scheduler_config) -> float:
    """The scheduler's dynamic shift for an image of ``image_seq_len`` packed tokens."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    return calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )


def training_schedule(scheduler, steps: int, image_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [T], sigmas [T]) from sigmas ``linspace(1, 1/T, T)`` shifted for this image size."""
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    mu = shift_mu(image_seq_len, scheduler.config) if scheduler.config.get("use_dynamic_shifting") else None
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device="cpu")
    return scheduler.timesteps.clone(), scheduler.sigmas[:steps].clone()


def sample_indices(
    batch_size: int,
    steps: int,
    generator: torch.Generator,
    uniform_sampling: bool,
    rank: int,
    world_size: int,
    weighting_scheme: str = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Indices into the schedule: each rank's own slice of [0, T) (uniform), or SD3 density sampling."""
    if uniform_sampling:
        lo = rank * steps // world_size
        hi = max(lo + 1, (rank + 1) * steps // world_size)
        return torch.randint(lo, hi, (batch_size,), generator=generator)
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme, batch_size, logit_mean, logit_std, mode_scale, generator=generator
    )
    return (u * steps).long().clamp(0, steps - 1)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t = (1-σ)·x0 + σ·noise, target = noise - x0) with σ per sample."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0)
    return (1.0 - s) * x0 + s * noise, noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, weighting_scheme: str) -> torch.Tensor:
    """MSE without the elements where |pred - target| > 50, times the SD3 weighting, mean."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    diff = pred.float() - target.float()
    keep = (diff.abs() <= OUTLIER_THRESHOLD).float()
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas.float()).view(-1, *([1] * (diff.dim() - 1)))
    return (weighting * diff.pow(2) * keep).mean()
