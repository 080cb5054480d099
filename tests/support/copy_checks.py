"""Checks of training copies shared by the unit and integration tests."""

from __future__ import annotations

import pytest
from helpers import extract


@pytest.fixture(scope="module")
def copied(sample_data_dir, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("copies") / "compose_multi"
    extract(
        sample_data_dir / "compose_multi" / "data.jsonl", out, tiny_model_dir, "--skip_embeddings",
        "--train_copy_size", "64", "--max_samples_per_shard", "4", check=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def plain(sample_data_dir, tiny_model_dir, tmp_path_factory):
    """The same task without copies."""
    out = tmp_path_factory.mktemp("plain") / "compose_multi"
    extract(
        sample_data_dir / "compose_multi" / "data.jsonl", out, tiny_model_dir, "--skip_embeddings",
        "--max_samples_per_shard", "4", check=True,
    )  # fmt: skip
    return out
