"""Training math, each piece against an independent computation written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.families.qwen_edit import forward
from pipeline.train.engine import flow
from pipeline.train.engine.step import step_generator

SPECIFIES = (
    "pipeline.families.qwen_edit.forward",
    "pipeline.train.engine.step",
)


class _Cfg(dict):
    def __getattr__(self, k):
        return self[k]


def test_latent_normalisation_and_packing():
    class FakeDist:
        def __init__(self, x):
            self.x = x

        def mode(self):
            return self.x

    class FakeVae:
        device, dtype = torch.device("cpu"), torch.float32
        config = _Cfg(latents_mean=[0.5, -1.0], latents_std=[2.0, 4.0])

        def encode(self, x):  # [B, 3, 1, H, W] -> 2 channels at /8
            lat = x[:, :2, :, ::8, ::8] * 3
            return type("O", (), {"latent_dist": FakeDist(lat)})()

    pixels = torch.randn(3, 3, 32, 48)
    lat = flow.encode_latents(FakeVae(), pixels, mini_batch=2)
    raw = pixels[:, :2, ::8, ::8] * 3
    expected = (raw - torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)) / torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    assert torch.allclose(lat, expected)  # the same fp32 operations in the same order: equal up to default rtol
    packed = forward.pack_latents(lat)
    b, c, h, w = lat.shape
    assert packed.shape == (b, (h // 2) * (w // 2), 4 * c)
    # token (i, j) holds channels in order c, then 2x2 position (dy, dx)
    for i in range(h // 2):
        for j in range(w // 2):
            token = packed[:, i * (w // 2) + j]
            manual = torch.stack(
                [lat[:, ch, 2 * i + dy, 2 * j + dx] for ch in range(c) for dy in (0, 1) for dx in (0, 1)], dim=1
            )
            assert torch.equal(token, manual)


def test_sigma_schedule_and_shift(tiny_model_dir):
    from pipeline.train.engine.model import load_scheduler

    sched = load_scheduler(str(tiny_model_dir))
    T, seq = 1000, 1024
    timesteps, sigmas = flow.training_schedule(sched, T, seq)
    cfg = sched.config
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    mu = seq * m + cfg["base_shift"] - m * cfg["base_image_seq_len"]
    s = np.linspace(1.0, 1.0 / T, T)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)  # exponential time shift
    one_minus = 1 - shifted
    stretched = 1 - one_minus / (one_minus[-1] / (1 - cfg["shift_terminal"]))  # shift_terminal stretch
    # the schedule is computed in fp32, the reference in float64: values in [0, 1] carry ≲ 10 roundings of
    # 6e-8 each, so 1e-5 (and 1e-3 on the ×1000 timesteps) leave > 10× on any CPU; a wrong shift moves them by > 1e-2
    assert np.allclose(sigmas.numpy(), stretched, atol=1e-5)
    assert np.allclose(timesteps.numpy(), stretched * 1000, atol=1e-3)
    assert sigmas[0] > sigmas[-1] and abs(float(sigmas[-1]) - cfg["shift_terminal"]) < 1e-5


def test_uniform_per_rank_ranges_and_density_sampling():
    g = torch.Generator().manual_seed(0)
    for rank, world in [(0, 2), (1, 2), (2, 3)]:
        idx = flow.sample_indices(4000, 1000, g, True, rank, world)
        lo, hi = rank * 1000 // world, (rank + 1) * 1000 // world
        assert idx.min() >= lo and idx.max() < hi and idx.float().std() > (hi - lo) / 4
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    idx = flow.sample_indices(64, 1000, g1, False, 0, 1, "logit_normal", 0.0, 1.0)
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(64,), generator=g2))
    assert torch.equal(idx, (u * 1000).long().clamp(0, 999))
    g1, g2 = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    idx = flow.sample_indices(64, 1000, g1, False, 0, 1, "mode", mode_scale=1.29)
    u = torch.rand(64, generator=g2)
    u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    assert torch.equal(idx, (u * 1000).long().clamp(0, 999))


def test_generator_depends_on_seed_rank_and_step():
    draw = lambda *a: torch.rand(4, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(1, 0, 5), draw(1, 0, 5))
    assert not torch.equal(draw(1, 0, 5), draw(1, 0, 6))
    assert not torch.equal(draw(1, 0, 5), draw(1, 1, 5))
    assert not torch.equal(draw(1, 0, 5), draw(2, 0, 5))


def test_noisy_input_target_img_shapes_slice_mask_and_weighting():
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 6, 8, generator=generator), torch.randn(2, 6, 8, generator=generator)
    sig = torch.tensor([0.25, 0.9])
    xt, target = flow.noisy_input(x0, noise, sig)
    expected = torch.stack([0.75 * x0[0] + 0.25 * noise[0], 0.1 * x0[1] + 0.9 * noise[1]])
    # float32 1 - 0.9 is not the literal 0.1, and each product and the sum round once: at most a few ε of |x0| + |noise|
    # per element (allclose's fixed atol of 1e-8 failed 3.5 % of unseeded draws for elements near zero)
    assert ((xt - expected).abs() <= 4 * torch.finfo(torch.float32).eps * (x0.abs() + noise.abs())).all()
    assert torch.equal(target, noise - x0)
    tgt_lat, srcs = torch.zeros(2, 16, 8, 12), [torch.zeros(2, 16, 4, 6), torch.zeros(2, 16, 12, 8)]
    assert forward.img_shapes(tgt_lat, srcs) == [[(1, 4, 6), (1, 2, 3), (1, 6, 4)]] * 2
    pred, tgt = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    pred[0, 0, 0] = 60.0  # |diff| 59 > 50: left out
    pred[1, 2, 3] = 40.0  # |diff| 39: kept
    loss = flow.flow_loss(pred, tgt, torch.tensor([0.5, 0.5]), "none")
    diff = pred - tgt
    expected = (diff.pow(2) * (diff.abs() <= 50)).mean()
    assert torch.isclose(loss, expected) and loss < 59**2 / 24
    weighted = flow.flow_loss(pred, tgt, torch.tensor([0.5, 0.25]), "sigma_sqrt")
    w = torch.tensor([0.5**-2, 0.25**-2]).view(2, 1, 1)
    assert torch.isclose(weighted, (w * diff.pow(2) * (diff.abs() <= 50)).mean())
    cos = flow.flow_loss(pred, tgt, torch.tensor([0.5, 0.25]), "cosmap")
    wc = (2 / (math.pi * (1 - 2 * torch.tensor([0.5, 0.25]) + 2 * torch.tensor([0.5, 0.25]) ** 2))).view(2, 1, 1)
    assert torch.isclose(cos, (wc * diff.pow(2) * (diff.abs() <= 50)).mean())


@pytest.mark.parametrize("seq", [256, 4096])
def test_shift_grows_with_image_size(tiny_model_dir, seq):
    from pipeline.train.engine.model import load_scheduler

    sched = load_scheduler(str(tiny_model_dir))
    small = flow.training_schedule(sched, 100, 64)[1]
    big = flow.training_schedule(sched, 100, seq)[1]
    assert (big[1:-1] >= small[1:-1]).all()
