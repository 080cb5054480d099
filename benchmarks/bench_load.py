"""Host memory per rank and time while the transformer loads, at 1 and 2 processes (FSDP, gloo, CPU).

    python benchmarks/bench_load.py                 # a real-width DiT (hidden 3072) with 3 blocks, full fine-tuning
    python benchmarks/bench_load.py --blocks 2 --lora

Writes a transformer of the published width (24 heads × 128, the published joint
attention and RoPE sizes) with ``--blocks`` blocks and random weights, in bf16
safetensors as published, into a copy of the tiny model's folder; then loads it
the way training does (``build_training_models`` + the FSDP strategy's
``prepare``) under torchrun with 1 and with 2 processes, and the way it loaded
before (the whole model with ``from_pretrained``, then sharded) for comparison.
Each rank reports its peak memory above what it held before the load (anonymous:
what it allocated; resident: also the file pages it read, which the kernel can
drop), the seconds the load took, and checks every parameter it holds against the
file (bitwise, in the parameter's dtype). Prints the per-rank figures and their
ratio, 2 processes / 1 (a share, not the whole: want ≤ 0.6). ``--worker`` is what
each rank runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def anon_kib() -> int:
    """Anonymous resident memory now (KiB): what the process itself allocated. Resident memory also counts the pages
    of the safetensors files it has mapped and read, which the kernel drops when memory is short (and which the
    processes of a node share)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))


class PeakAnon:
    """The highest :func:`anon_kib` while it runs (sampled every 2 ms on a thread)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = anon_kib(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, anon_kib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_kib())


def write_model(folder: Path, blocks: int, heads: int, head_dim: int) -> Path:
    """The tiny model's folder with a wider transformer: random weights in bf16 safetensors."""
    import torch

    from pipeline import families
    from pipeline.kit.tiny_model import make_tiny_model

    make_tiny_model(folder)
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(0)
    transformer = families.detect(str(folder)).transformer_class()(
        num_layers=blocks,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56) if head_dim == 128 else (head_dim // 8, 3 * head_dim // 8, 3 * head_dim // 8),
    )
    torch.nn.Module.to(transformer, torch.bfloat16)
    transformer.save_pretrained(folder / "transformer", safe_serialization=True, max_shard_size="1GB")
    return folder


def worker(model: str, lora: bool, whole: bool = False) -> None:
    """One rank: load as training does, check every parameter it holds against the file, print one JSON line.
    ``whole``: the way loads went before (the whole model built with ``from_pretrained`` in host memory, then
    sharded), measured beside the new one for the comparison."""
    import torch
    from accelerate import Accelerator
    from safetensors import safe_open

    from pipeline.train.config.model import LoraConfig, ModelConfig
    from pipeline.train.engine import parallel
    from pipeline.train.engine.loading import BASE_LAYER, safetensors_source, shard_rows
    from pipeline.train.engine.model import build_training_models

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # on a GPU the rows go straight to it
    import peft  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    from pipeline import families

    family = families.detect(model)
    family.transformer_class(), family.vae_class()  # imports are not the load

    before, rss_before = anon_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    watch = PeakAnon().__enter__()
    config = ModelConfig(pretrained=model, lora=LoraConfig(rank=8, alpha=8) if lora else None)
    if whole:
        from pipeline.train.engine.model import load_transformer, select_trainable

        dtype = torch.bfloat16 if lora else torch.float32
        loaded = load_transformer(model, None, dtype)
        groups = [{"params": select_trainable(loaded, ["."], [])[0]}]
        built = type("Built", (), {"transformer": loaded, "groups": groups, "weights": None})
    else:
        built = build_training_models(config, "bf16", 1e-4, 0, accelerator.device, sharded=True)
    strategy = parallel.strategy(True, accelerator, "bf16")
    transformer, _ = strategy.prepare(built.transformer, built.groups, torch.optim.AdamW, built.weights)
    seconds = time.perf_counter() - started
    watch.__exit__(None, None, None)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, file pages included
    files = safetensors_source(model, None).files
    handles: dict = {}
    checked = mismatched = held = total = 0
    for name, param in transformer.named_parameters():
        local, rows = shard_rows(param)
        held += local.numel() * local.element_size()
        total += param.numel() * param.element_size()
        if ".lora_" in name:
            continue
        path, key = files[name.replace(BASE_LAYER, ".")]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt", device="cpu")
        expected = handles[path].get_slice(key)
        expected = expected[:] if rows is None else expected[rows[0] : rows[1]]
        checked += 1
        mismatched += not torch.equal(local, expected.to(local.device, local.dtype))
    result = {
        "rank": accelerator.process_index,
        "ranks": accelerator.num_processes,
        "model_MB": round(total / 1e6, 1),
        "held_MB": round(held / 1e6, 1),
        "peak_anon_above_start_MB": round((watch.peak - before) / 1024, 1),
        "peak_rss_above_start_MB": round((peak_rss - rss_before) / 1024, 1),
        "load_s": round(seconds, 2),
        "checked": checked,
        "mismatched": mismatched,
        "dtypes": sorted({str(p.dtype) for p in transformer.parameters()}),
    }
    print(json.dumps(result), flush=True)


def launch(model: Path, processes: int, lora: bool, whole: bool = False) -> list[dict]:
    """``torchrun`` with ``processes`` ranks running :func:`worker`; every rank's JSON line."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, str(Path(__file__).resolve()), "--worker", "--model", str(model)]
    command += ["--lora"] * lora + ["--whole"] * whole
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return sorted((json.loads(line) for line in out.splitlines() if line.startswith("{")), key=lambda r: r["rank"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=3, help="transformer blocks (the published model has 60)")
    p.add_argument("--heads", type=int, default=24, help="attention heads (published: 24)")
    p.add_argument("--head_dim", type=int, default=128, help="attention head width (published: 128)")
    p.add_argument("--lora", action="store_true", help="LoRA r8 (the base in bf16) instead of full fine-tuning (fp32)")
    p.add_argument("--model", default=None, help="a model folder to load (default: written here)")
    p.add_argument("--worker", action="store_true", help="run one rank's load (under torchrun)")
    p.add_argument("--whole", action="store_true", help="with --worker: the old load (whole model, then sharded)")
    args = p.parse_args()
    if args.worker:
        worker(args.model, args.lora, args.whole)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        model = Path(args.model) if args.model else write_model(work / "model", args.blocks, args.heads, args.head_dim)
        summary = {}
        for name, whole in (("sharded_load", False), ("whole_then_shard (before)", True)):
            one, two = launch(model, 1, args.lora, whole), launch(model, 2, args.lora, whole)
            per_rank = {n: max(r["peak_anon_above_start_MB"] for r in runs) for n, runs in ((1, one), (2, two))}
            summary[name] = {
                "peak_anon_above_start_MB_per_rank": per_rank,
                "peak_rss_above_start_MB_per_rank": {
                    n: max(r["peak_rss_above_start_MB"] for r in runs) for n, runs in ((1, one), (2, two))
                },  # fmt: skip
                "load_s": {1: max(r["load_s"] for r in one), 2: max(r["load_s"] for r in two)},
                "ratio_per_rank_2_over_1": round(per_rank[2] / per_rank[1], 2),
                "all_exact": all(r["mismatched"] == 0 and r["checked"] > 0 for r in one + two),
            }
        print(json.dumps({"model_MB": one[0]["model_MB"], "lora": args.lora, **summary}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
