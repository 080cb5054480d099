"""The shipped launch commands, as users run them: ``accelerate launch`` (not torchrun) on 2 CPU processes,
through a checkpoint, a resume and an export. Only the placeholders and the run's length and size are replaced."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import free_port
from helpers import REPO, no_traceback_of_ours

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def shipped(script: str, placeholders: dict[str, str], *overrides: str) -> str:
    """The script's text with its placeholders filled and ``overrides`` appended to its training command."""
    text = (EXAMPLES / script).read_text()
    for old, new in placeholders.items():
        assert old in text, f"{script} no longer holds {old}"
        text = text.replace(old, new)
    lines = text.rstrip("\n").splitlines()
    last = max(i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#"))
    assert not lines[last].rstrip().endswith("\\"), "the training command ends the script"
    lines[last] += " " + " ".join(overrides)
    return "\n".join(lines) + "\n"


def launch(text: str, tmp_path: Path, name: str):
    script = tmp_path / name
    script.write_text(text)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PATH": f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's accelerate
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert no_traceback_of_ours(result.stderr)
    return result


SMALL = ["--image_sample_size=64", "--train_batch_size=1", "--train_src_img_num_weights=1=1", "--report_to=none"]


def test_the_fsdp_command_runs_checkpoints_resumes_and_exports(tiny_model_dir, meta_dir, tmp_path):
    """examples/train_fsdp.sh: accelerate launch --use_fsdp ... (accelerate's FSDP plugin flags) → our FSDP2."""
    out = tmp_path / "fsdp"
    placeholders = {
        "/path/to/Qwen-Image-Edit-2509": str(tiny_model_dir),
        "/path/to/shards": str(meta_dir),
        "/path/to/ckpts": str(out),
        "dataset_a=0.5,dataset_b=1.2,dataset_c=1.0": "edit_single=1",
    }
    first = shipped("train_fsdp.sh", placeholders, *SMALL, "--max_train_steps=2", "--checkpointing_steps=1")
    launch(first, tmp_path, "first.sh")
    assert (out / "checkpoint-2" / "fsdp" / "rank1.safetensors").exists(), "sharded by our FSDP2 over 2 ranks"
    assert json.loads((out / "checkpoint-2" / "checkpoint.json").read_text())["fsdp"] is True
    resumed = shipped(
        "train_fsdp.sh", placeholders, *SMALL, "--max_train_steps=3", "--resume_from_checkpoint=checkpoint-1"
    )
    log = launch(resumed, tmp_path, "resumed.sh").stderr
    assert "resumed from" in log and "checkpoint-1" in log
    exported = shipped(
        "train_fsdp.sh",
        placeholders,
        *SMALL,
        f"--export_checkpoint={out / 'checkpoint-3'}",
    ).replace(f'--output_dir="{out}"', f'--output_dir="{tmp_path / "export"}"')
    launch(exported, tmp_path, "export.sh")
    from diffusers import QwenImageTransformer2DModel

    QwenImageTransformer2DModel.from_pretrained(tmp_path / "export" / "transformer")


def test_the_lora_command_runs_checkpoints_resumes_and_exports(tiny_model_dir, meta_dir, sample_data_dir, tmp_path):
    """examples/train_lora.sh: accelerate launch --num_processes N (DDP), validation, both LoRA formats, latest."""
    out = tmp_path / "lora"
    validation = tmp_path / "validation.jsonl"
    source = sample_data_dir / "edit_single" / "images" / "0000_src.jpg"
    validation.write_text(json.dumps({"source_image": str(source), "instruction": "Make it blue."}) + "\n")
    placeholders = {
        "/path/to/Qwen-Image-Edit-2509": str(tiny_model_dir),
        "/path/to/shards": str(meta_dir),
        "/path/to/lora_run": str(out),
        "/path/to/validation.jsonl": str(validation),
        "dataset_a=1,dataset_b=1": "edit_single=1",
    }
    short = [*SMALL, "--validation_inference_steps=1", "--checkpointing_steps=2", "--validation_steps=2"]
    launch(shipped("train_lora.sh", placeholders, *short, "--max_train_steps=2"), tmp_path, "first.sh")
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").exists()
    log = launch(shipped("train_lora.sh", placeholders, *short, "--max_train_steps=4"), tmp_path, "again.sh").stderr
    assert "resumed from" in log and "checkpoint-2" in log  # the script's own --resume_from_checkpoint latest
    for name in ("pytorch_lora_weights.safetensors", "qwen_image_edit_lora_comfyui.safetensors"):
        assert (out / name).exists() and (out / "checkpoint-4" / name).exists()
    assert (out / "validation" / "step-000004").is_dir()
