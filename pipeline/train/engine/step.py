"""One optimizer step's pieces: the flow-matching loss of a batch, gradient clipping, the non-finite policy.

The Trainer strings them together (``Trainer.train_step``); each is usable alone,
so a test or a benchmark runs the real loss or the real clipping without a Trainer.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from pipeline import families
from pipeline.common import images as imaging
from pipeline.train.config.model import FlowConfig, OptimConfig
from pipeline.train.engine import flow
from pipeline.train.engine.clipping import clip_bound
from pipeline.train.stream.batching import pad_embeddings
from pipeline.train.stream.seeding import SEED_MASK

log = logging.getLogger("pipeline.train")

TRAINER_STATE = "trainer_state.json"  # the non-finite counters, in every checkpoint


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """CPU torch generator for one (seed, rank, step): noise and timesteps, the same after a resume."""
    mixed = np.random.SeedSequence([seed & SEED_MASK, rank, step, 0x5EED]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(mixed))


class NonFiniteTraining(RuntimeError):
    """Too many optimizer steps in a row had a NaN/Inf gradient norm."""


def batch_loss(
    batch: dict[str, Any],
    transformer,
    vae,
    scheduler,
    cfg: FlowConfig,
    rank: int,
    world: int,
    loader_step: int,
    device: torch.device | None = None,
    family=None,
):
    """Flow-matching loss of one batch; the noise depends on (seed, rank, step) only. ``device``: where the
    transformer computes (default: where its parameters are; not so under FSDP's CPU offload). The model
    family (default: the one of v1 shards) packs the latents and runs the forward."""
    family = family or families.get(None)
    device = device or next(p.device for p in transformer.parameters())
    x0 = flow.encode_latents(vae, batch["target"], cfg.vae_mini_batch)
    sources = [flow.encode_latents(vae, s, cfg.vae_mini_batch) for s in batch["sources"]]
    generator = step_generator(cfg.seed, rank, loader_step)
    packed_x0 = family.pack_latents(x0)
    timesteps, sigmas = flow.training_schedule(scheduler, cfg.sampling_steps, packed_x0.shape[1])
    idx = flow.sample_indices(
        x0.shape[0],
        cfg.sampling_steps,
        generator,
        cfg.uniform_sampling,
        rank,
        world,
        cfg.weighting_scheme,
        cfg.logit_mean,
        cfg.logit_std,
        cfg.mode_scale,
    )
    # drawn on the CPU generator so the values do not depend on the device, then moved to the latents
    noise = torch.randn(packed_x0.shape, generator=generator, dtype=torch.float32).to(packed_x0.device, packed_x0.dtype)
    sigma = sigmas[idx].to(packed_x0.device)
    noisy, target = flow.noisy_input(packed_x0, noise, sigma)
    dtype = next(p.dtype for p in transformer.parameters())
    pred = family.predict(transformer, noisy, x0, sources, batch, timesteps[idx] / 1000, device, dtype)
    return flow.flow_loss(pred, target.to(device), sigma.to(device), cfg.weighting_scheme)


def clip_gradients(params: list[torch.nn.Parameter], step: int, optim: OptimConfig) -> tuple[float, float]:
    """The original tool's clipping (see ``clipping``): returns (global norm before clipping, bound applied).

    One pass for the norm, one for the scaling when it clips; under FSDP the norm of
    sharded gradients is a DTensor whose partial sums are reduced for the bound.
    Gradients must be unscaled first (fp16).
    """
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    ratio, start = optim.initial_grad_norm_ratio, optim.abnormal_norm_clip_start
    bound = clip_bound(norm, step, optim.max_grad_norm, ratio, start)
    if math.isfinite(norm) and norm > bound:
        torch.nn.utils.clip_grads_with_norm_(params, bound, total)
        if bound < optim.max_grad_norm and step > start:
            log.warning("step %d: abnormal gradient norm %.3g, clipped to %.3g", step + 1, norm, bound)
    return norm, bound if math.isfinite(bound) else 0.0


class NonFinitePolicy:
    """A step whose gradient norm is NaN/Inf skips its update; ``limit`` of them in a row stop the run.

    Its counters are identical on every rank (they follow the all-reduced norm), so
    rank 0 saves them (``trainer_state.json``) and all ranks skip together.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.steps = 0
        self.in_a_row = 0

    def finite(self) -> None:
        self.in_a_row = 0

    def skip(self, step: int, grad_norm: float) -> None:
        self.steps += 1
        self.in_a_row += 1
        log.warning(
            "step %d: gradient norm %s, update skipped (%d in a row, %d in all)", step, grad_norm, self.in_a_row,
            self.steps,
        )  # fmt: skip
        if self.in_a_row >= self.limit:
            raise NonFiniteTraining(
                f"{self.in_a_row} steps in a row had a non-finite gradient norm (--max_nonfinite_steps "
                f"{self.limit}); the weights were not updated by any of them. Lower the learning rate, check the "
                "data (shards_tools verify), or resume from an earlier checkpoint"
            )

    def check_last(self, step: int, loss: float) -> None:
        """The run's last step: a non-finite loss there means the weights the run would export produce NaN/Inf
        (an exploded run whose later updates were skipped still holds finite, useless weights). Stops the run
        before that step is saved or anything is exported."""
        if not math.isfinite(loss):
            raise NonFiniteTraining(
                f"the run's last step ({step}) had a non-finite loss ({loss}), the last {self.in_a_row} update(s) "
                f"skipped as non-finite: the weights diverged, so step {step} was neither saved nor exported. Lower "
                "the learning rate, or resume from an earlier checkpoint"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_steps": self.steps, "nonfinite_in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["nonfinite_steps"])
        self.in_a_row = int(state["nonfinite_in_a_row"])


def encode_online(batch: dict[str, Any], builder, encoder) -> None:
    """``--condition_encoder_mode sync``: the batch's prompts encoded with the extraction code, on this device."""
    embeddings = []
    for cond in batch.pop("conditions"):
        if cond["kind"] == "t2i":
            inputs = builder.t2i(cond["text"])
        else:
            pictures = [imaging.open_rgb(b) for b in cond["images"]]
            inputs = builder.edit(builder.condition_images(pictures, cond["target_size"]), cond["text"])
        embeddings.append(encoder.encode([inputs], builder.drop_index)[0].to(torch.bfloat16))
    batch["prompt_embeds"], batch["prompt_mask"] = pad_embeddings(embeddings)
