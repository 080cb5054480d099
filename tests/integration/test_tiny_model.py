"""The tiny-model kit: diffusers loads it, it generates, its tokenizer behaves like Qwen's."""

from __future__ import annotations

import subprocess
import sys

from pipeline.kit import tiny_model  # the kit's entry point (make_tiny_model)


def test_cli_is_deterministic(tmp_path, tiny_model_dir):
    out = tmp_path / "again"
    subprocess.run(
        [sys.executable, "-m", "shards_tools", "make-tiny-model", str(out), "--seed", "0"],
        check=True,
        capture_output=True,
    )
    for path in sorted(tiny_model_dir.rglob("*")):
        if path.is_file():
            twin = out / path.relative_to(tiny_model_dir)
            assert twin.read_bytes() == path.read_bytes(), path.relative_to(tiny_model_dir)
    other = tmp_path / "seed1"
    tiny_model.make_tiny_model(other, seed=1)
    assert (other / "transformer/diffusion_pytorch_model.safetensors").read_bytes() != (
        tiny_model_dir / "transformer/diffusion_pytorch_model.safetensors"
    ).read_bytes()
