"""Shared fixtures: one tiny model and one sample dataset per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from pipeline.kit.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory):
    from pipeline.kit.sample_data import make_sample_data

    out = tmp_path_factory.mktemp("sample-data")
    make_sample_data(out, samples=12, seed=0)
    return out


@pytest.fixture
def small_vae_inputs(monkeypatch):
    """Edit-Plus resizes VAE inputs to ~1024² whatever the request; shrink that for CPU tests."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
