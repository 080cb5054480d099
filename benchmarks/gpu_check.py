"""One command to check the real-scale path on a GPU, ready the moment one is available.

    python benchmarks/gpu_check.py            # real widths on CUDA, the tiny model on a CPU
    python benchmarks/gpu_check.py --real_width   # on a CPU: published widths, 2 blocks, FSDP on 2 processes

No downloads: random weights in the real configurations — the Qwen-Image DiT at full
width with --blocks of its 60 blocks, the real VAE config, Qwen2.5-VL at full width
with 2 text and 2 vision layers. It runs the project's own entry points and prints
one JSON with:

* extraction prompts/s with the default (padded) batching and with exact batching;
* LoRA (one process) and full fine-tuning under FSDP (on CUDA also LoRA on an fp8 base and full
  fine-tuning with CPU offload): median training step time, the
  same model's bare forward+backward on synthetic tensors of the same shapes, their
  ratio, the data-wait fraction, peak memory, and (from a half-depth run) peak memory
  per block extrapolated to 60 blocks;
* beside each measured peak, the plan's figure for the same mode and its ratio (the first GPU run
  calibrates ``--plan``);
* one checkpoint + resume (the largest weight difference against the straight run);
* the LoRA and full exports loaded in the model family's diffusers pipeline.

On a CPU the same steps run on the tiny model (so CI keeps this script working); the
figures only mean something on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GiB = 1024**3


def build_model(out: Path, real: bool, blocks: int, device: str, family: str = "qwen_edit") -> Path:
    from pipeline.families.qwen_edit.tiny import SIZES
    from pipeline.kit.tiny_model import make_tiny_model

    if (out / "model_index.json").exists():
        return out
    if family != "qwen_edit":  # Qwen-Image 2.1: the tiny model (its real-width rehearsal is not written yet)
        with torch.device(device):
            return make_tiny_model(out, seed=0, family=family)
    size = "tiny"
    if real:
        size = dataclasses.replace(
            SIZES["real"], dit_layers=blocks, text_layers=2, vision_depth=2, vision_full_attention=(1,)
        )
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        return make_tiny_model(out, seed=0, size=size)


def half_depth(model: Path) -> tuple[Path, int]:
    """A transformer folder with the first half of the blocks (same weight files, smaller config)."""
    config = json.loads((model / "transformer" / "config.json").read_text())
    half = max(1, config["num_layers"] // 2)
    folder = model.parent / "transformer_half"
    folder.mkdir(exist_ok=True)
    for f in (model / "transformer").iterdir():
        if f.name != "config.json" and not (folder / f.name).exists():
            os.symlink(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": half}))
    return folder, half


def extraction(model: Path, data: Path, work: Path, batching: str, batch_size: int, resolution: int = 1024) -> dict:
    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.extractor import Extractor

    out = work / f"shards_{batching}" / "check"
    if out.exists():
        shutil.rmtree(out)
    config = ExtractConfig(
        jsonl_path=str(data),
        output_dir=str(out),
        model_path=str(model),
        batching=batching,
        batch_size=batch_size,
        num_workers=2 if torch.cuda.is_available() else 0,
        condition_resolution=resolution,
    )
    extractor = Extractor(config, 0, 1)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the report
        stats = extractor.run()
        extractor.finish()
    return {
        "prompts_per_s": round(stats["prompts_encoded"] / stats["wall_seconds"], 2),
        "prompts_per_forward": round(stats["prompts_per_forward"], 2),
        "samples_per_s": round(stats["samples_written"] / stats["wall_seconds"], 2),
        "task": str(out),
    }


def train(
    model: Path, meta: Path, out: Path, steps: int, extra: list[str], mixed: str, size: int, nproc: int = 1
) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "pipeline.train"]
    cmd += ["--pretrained_model_name_or_path", str(model), "--train_data_meta_dir", str(meta)]
    cmd += ["--output_dir", str(out), "--max_train_steps", str(steps), "--checkpointing_steps", str(steps // 2)]
    cmd += ["--image_sample_size", str(size), "--mixed_precision", mixed, "--report_to", "none"]
    workers = "2" if torch.cuda.is_available() else "1"
    cmd += ["--dataloader_num_workers", workers, "--learning_rate", "1e-5", "--lr_warmup_steps", "0"]
    cmd += ["--train_batch_size", "1", "--train_src_img_num_weights", "0=1,1=1,2=1,3=1", *extra]
    if "--resume_from_checkpoint" not in extra:  # a rerun in the same --work_dir starts over (the old run moved aside)
        cmd.append("--overwrite_output_dir")
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    summary = json.loads((out / "run_summary.json").read_text())
    steady = summary["step_seconds"][1:] or summary["step_seconds"]
    summary["median_step_s"] = statistics.median(steady)
    return summary


def bare_step_seconds(model: Path, lora: bool, mixed: str, size: int, device: str, repeats: int = 5) -> float:
    """The transformer alone: forward + loss + backward on random tensors shaped like one training step."""
    from pipeline.families.qwen_edit import DEFAULT_LORA_TARGETS
    from pipeline.train.config.model import LoraConfig, ModelConfig
    from pipeline.train.engine.model import build_training_models

    lora_cfg = LoraConfig(rank=64, alpha=64, target_modules=DEFAULT_LORA_TARGETS) if lora else None
    config = ModelConfig(pretrained=str(model), lora=lora_cfg)
    transformer = build_training_models(config, mixed, 1e-5, device=device).transformer
    side = size // 16  # 8× VAE, 2×2 packing
    tokens = side * side
    dtype = {"bf16": torch.bfloat16}.get(mixed, torch.float32)
    hidden = torch.randn(1, 2 * tokens, transformer.config.in_channels, device=device, dtype=dtype)
    text = torch.randn(1, 512, transformer.config.joint_attention_dim, device=device, dtype=dtype)
    mask = torch.ones(1, 512, dtype=torch.long, device=device)
    timestep = torch.full((1,), 0.5, device=device, dtype=dtype)

    def once() -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            out = transformer(
                hidden_states=hidden,
                timestep=timestep,
                encoder_hidden_states=text,
                encoder_hidden_states_mask=mask,
                img_shapes=[[(1, side, side), (1, side, side)]],
                return_dict=False,
            )[0]
        out[:, :tokens].float().pow(2).mean().backward()
        transformer.zero_grad(set_to_none=True)

    once()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / repeats
    transformer.to("cpu")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return seconds


def planned_gib(model: Path, lora: bool, mixed: str, size: int, **changes) -> tuple[float, float]:
    """The plan's peak per GPU for the run's mode (its model, then the published 60 blocks): the figure the
    measured peak calibrates. Planned at 3 sources (the runs draw 0-3) and 512 text tokens."""
    from pipeline.families.qwen_edit import DEFAULT_LORA_TARGETS
    from pipeline.train.engine.plan import PlanRequest, build_on_meta, memory_plan, read_configs

    request = PlanRequest(
        lora=lora, lora_rank=64, lora_targets=DEFAULT_LORA_TARGETS, fsdp=not lora,
        mixed_precision=mixed, gradient_checkpointing=True, batch_size=1, image_sample_size=size, num_sources=3,
        text_tokens=512, gpu_memory_gib=80.0, **changes,
    )  # fmt: skip
    here = memory_plan(*build_on_meta(*read_configs(str(model))), request)["gib_per_gpu"]["total"]
    at_60 = memory_plan(*build_on_meta(*read_configs("qwen-image-edit-2509")), request)["gib_per_gpu"]["total"]
    return here, at_60


def plan_against_count() -> dict:
    """The plan's per-block bytes (from counts at a few tokens) against a direct count at 1,152 tokens on one block
    of the published width, bf16 autocast, for full fine-tuning and LoRA r64 without and with dropout."""
    from pipeline.families.qwen_edit import DEFAULT_LORA_TARGETS
    from pipeline.train.engine.activations import ActivationMode, block_activations, build_one_block, count_saved
    from pipeline.train.engine.plan import read_configs

    config, targets = read_configs("qwen-image-edit-2509")[0], DEFAULT_LORA_TARGETS
    out = {}
    for name, mode in (
        ("full", ActivationMode()),
        ("lora_r64", ActivationMode(lora_rank=64, lora_targets=targets)),
        ("lora_r64_dropout_0.05", ActivationMode(lora_rank=64, lora_targets=targets, lora_dropout=0.05)),
    ):
        planned = block_activations(config, mode).saved(1024, 128)
        counted, _ = count_saved(build_one_block(config, mode), mode, 1024, 128)
        out[name] = {"planned_mib": round(planned / 2**20, 1), "counted_mib": round(counted / 2**20, 1),
                     "ratio": round(planned / counted, 4)}  # fmt: skip
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def load_exports(model: Path, full: Path, lora_file: Path, size: int) -> dict:
    from PIL import Image

    from pipeline import families

    family = families.detect(str(model))
    pipe = family.inference_pipeline(str(model), str(full / "transformer"))
    pipe.load_lora_weights(str(lora_file))
    if torch.cuda.is_available():
        pipe.to("cuda", torch.bfloat16)
    image = family.render_edit(
        pipe, [Image.new("RGB", (size, size), (180, 60, 60))], "Make it blue.", family.validation_resolution(size**2),
        2, torch.Generator().manual_seed(0),
    )  # fmt: skip
    return {"loaded": True, "image_size": list(image.size), "image_mode": image.mode}


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default=None, help="where to write (default: a new temp folder)")
    p.add_argument(
        "--size", choices=["auto", "real", "tiny"], default="auto", help="auto: real widths on CUDA, tiny otherwise"
    )
    p.add_argument("--blocks", type=int, default=4, help="DiT blocks of the real-width model (of 60)")
    p.add_argument(
        "--family",
        choices=["qwen_edit", "qwen_image21"],
        default="qwen_edit",
        help="qwen_edit (default: every check below) or qwen_image21 (Qwen-Image 2.1 on its tiny model: extraction, "
        "LoRA and full FSDP training with their peaks, resume, exports in QwenImage21Pipeline)",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 10 on CUDA, 4 on CPU)")
    p.add_argument("--samples", type=int, default=None, help="sample-data rows per task (default 16 / 4)")
    p.add_argument(
        "--real_width",
        action="store_true",
        help="the rehearsal a CPU can run: the published widths with 2 DiT blocks and Qwen2.5-VL with 2+2 layers, "
        "64 px, LoRA and full fine-tuning under FSDP on 2 processes (gloo), checkpoint + resume + both exports in "
        "diffusers, and the plan's per-block bytes against a count on a real-width block",
    )
    args = p.parse_args()
    other_family = args.family != "qwen_edit"
    if other_family and (args.real_width or args.size == "real"):
        p.error(f"--family {args.family} runs on its tiny model: --real_width and --size real are Qwen-Image-Edit's")
    if other_family:
        args.size = "tiny"
    rehearsal = args.real_width and not cuda
    if args.real_width:
        args.size, args.blocks = "real", 2
    real = args.size == "real" or (args.size == "auto" and cuda)
    device = "cuda" if cuda else "cpu"
    steps = args.steps or (10 if cuda else 2 if rehearsal else 4)
    samples = args.samples or (16 if cuda else 2 if rehearsal else 4)
    size = 64 if not cuda else 512 if real else 64
    nproc = 2 if rehearsal else 1
    mixed = "bf16" if cuda or rehearsal else "no"  # the rehearsal: the autocast / FSDP param-dtype path GPUs run
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-"))
    started = time.perf_counter()
    sys.path.insert(0, str(REPO))
    from pipeline.common.logs import setup_logging
    from pipeline.kit.sample_data import combined_jsonl, make_sample_data

    setup_logging()
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "model": "real" if real else "tiny"}
    report["family"] = args.family
    model = build_model(work / "model", real, args.blocks, device, args.family)
    blocks = json.loads((model / "transformer" / "config.json").read_text())["num_layers"]
    report["dit_blocks"] = blocks
    data = make_sample_data(work / "data", samples=samples, seed=0)
    jsonl = combined_jsonl(work / "data", work / "all.jsonl")
    del data
    resolution = 384 if other_family else 1024  # 2.1's conditions: quick on the tiny model (Qwen-Image-Edit ignores it)
    report["extraction"] = {
        b: extraction(model, jsonl, work, b, 8 if cuda else 4, resolution) for b in ("padded", "exact")
    }
    meta = Path(report["extraction"]["padded"]["task"]).parent

    lora_flags = ["--use_peft_lora", "--lora_rank", "64", "--lora_alpha", "64", "--gradient_checkpointing"]
    if rehearsal:  # both modes sharded over the 2 processes
        lora_flags += ["--parallelism", "fsdp"]
    fsdp_flags = ["--parallelism", "fsdp", "--gradient_checkpointing"]
    runs = {}
    modes = [("lora", lora_flags, True, {}), ("full_fsdp", fsdp_flags, False, {})]
    if cuda:  # the options for smaller cards, measured beside their plan
        modes += [
            ("lora_fp8_base", [*lora_flags, "--base_weight_dtype", "float8_e4m3fn"], True,
             {"base_weight_dtype": "float8_e4m3fn"}),
            ("full_fsdp_cpu_offload", [*fsdp_flags, "--fsdp_cpu_offload"], False, {"cpu_offload": True}),
        ]  # fmt: skip
    for name, flags, lora, changes in modes:
        summary = train(model, meta, work / name, steps, flags, mixed, size, nproc)
        entry = {
            "processes": nproc,
            "median_step_s": round(summary["median_step_s"], 4),
            "data_wait_fraction": round(summary["data_wait_fraction"], 4),
        }
        if not rehearsal and not other_family:  # the bare forward+backward of the same shapes (Qwen-Image-Edit's)
            bare = bare_step_seconds(model, lora, mixed, size, device)
            entry["bare_forward_backward_s"] = round(bare, 4)
            entry["step_over_bare"] = round(summary["median_step_s"] / bare, 3)
        if summary["peak_memory_bytes"]:  # CUDA only: a half-depth run gives the memory one block adds
            half_folder, half = half_depth(model)
            flags_half = [*flags, "--transformer_path", str(half_folder)]
            half_run = train(model, meta, work / f"{name}_half", steps, flags_half, mixed, size)
            per_block = (summary["peak_memory_bytes"] - half_run["peak_memory_bytes"]) / (blocks - half)
            at_60 = summary["peak_memory_bytes"] + (60 - blocks) * per_block
            entry["peak_memory_gib"] = round(summary["peak_memory_bytes"] / GiB, 2)
            entry["peak_memory_per_block_gib"] = round(per_block / GiB, 3)
            entry["peak_memory_60_blocks_gib"] = round(at_60 / GiB, 1)
            if other_family:  # the plan's calibration against 60 published blocks is Qwen-Image-Edit's
                runs[name] = entry
                continue
            plan_here, plan_60 = planned_gib(model, lora, mixed, size, **changes)
            entry["planned_peak_gib"] = round(plan_here, 2)
            entry["measured_over_planned"] = round(summary["peak_memory_bytes"] / GiB / plan_here, 3)
            entry["planned_peak_60_blocks_gib"] = round(plan_60, 1)
            entry["measured_over_planned_60_blocks"] = round(at_60 / GiB / plan_60, 3)
        runs[name] = entry
    report["training"] = runs

    # host memory per rank and time while the transformer loads (sharded load, and the whole-model load before it):
    # on a GPU, and in the CPU rehearsal at the published width (the tiny model's load says nothing)
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_load", REPO / "benchmarks" / "bench_load.py")
    bench_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_load)
    load_ranks = min(2, max(1, torch.cuda.device_count())) if cuda else 2
    report["load"] = (
        (cuda or rehearsal)
        and not other_family
        and {
            how: {f"{n}_process": bench_load.launch(model, n, lora=True, whole=whole) for n in sorted({1, load_ranks})}
            for how, whole in (("sharded", False), ("whole_then_shard", True))
        }
    )

    # one checkpoint + resume: restart the LoRA run from its middle checkpoint
    resumed = work / "lora_resumed"
    shutil.rmtree(resumed, ignore_errors=True)
    resumed.mkdir()
    shutil.copytree(work / "lora" / f"checkpoint-{steps // 2}", resumed / f"checkpoint-{steps // 2}")
    train(model, meta, resumed, steps, [*lora_flags, "--resume_from_checkpoint", "latest"], mixed, size, nproc)
    a = weights(work / "lora")
    b = weights(resumed)
    report["resume"] = {
        "same_keys": a.keys() == b.keys(),
        "max_abs_weight_difference": max(float((a[k].float() - b[k].float()).abs().max()) for k in a),
    }
    report["exports_in_diffusers"] = load_exports(
        model, work / "full_fsdp", work / "lora" / "pytorch_lora_weights.safetensors", size
    )
    if rehearsal:
        report["plan_vs_count"] = plan_against_count()
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
