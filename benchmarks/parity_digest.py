"""Digests of what the tool computes, to show a refactor changed nothing: the shards extraction writes and the
weights fixed-seed training runs leave, in one JSON file per commit.

    python benchmarks/parity_digest.py --work_dir /tmp/parity --out before.json   # on the old commit
    python benchmarks/parity_digest.py --work_dir /tmp/parity --out after.json    # on the new one
    python benchmarks/parity_digest.py --compare before.json after.json

Use the same --work_dir for both (the model's path is recorded in manifests). Recorded:

* extraction of the sample data (three tasks, 2509 tiny model, one process): the sha256 of every shard, index and
  null embedding, and each manifest with its model path left out;
* four training runs of 4 steps from seed 3 (LoRA and full, one process and FSDP on 2 processes): the sha256 of every
  weight, optimizer, scheduler, RNG and data-state file of the checkpoints at steps 2 and 4 (``checkpoint.json``
  holds the run's random id, ``rng_rank*`` the unseeded global RNG states: both left out), of the exports, and the
  final loss. Safetensors files are digested by their tensors and metadata (PEFT writes its target set in hash
  order); manifests without their creation time.

``--compare`` prints every key that differs, and exits 1 when one does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TRAININGS = {
    "lora": ["--use_peft_lora", "--lora_r", "4", "--lora_alpha", "4", "--learning_rate", "1e-3"],
    "full": ["--learning_rate", "1e-4"],
    "fsdp_lora": ["--use_peft_lora", "--lora_r", "4", "--lora_alpha", "4", "--learning_rate", "1e-3",
                  "--parallelism", "fsdp"],
    "fsdp_full": ["--learning_rate", "1e-4", "--parallelism", "fsdp"],
}  # fmt: skip
SKIPPED = ("checkpoint.json", "rng_rank")  # the run's random id; the global RNG states (unseeded, not computed)


def sha256(path: Path) -> str:
    """The file's bytes; for a safetensors file its tensors and metadata, with PEFT's ``target_modules`` (a set,
    written in hash order) sorted."""
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        for key in sorted(handle.keys()):
            tensor = handle.get_tensor(key)
            digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for key, value in sorted(metadata.items()):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        if isinstance(parsed, dict):
            parsed = {k: sorted(v) if k.endswith("target_modules") and isinstance(v, list) else v
                      for k, v in parsed.items()}  # fmt: skip
        digest.update(json.dumps([key, parsed], sort_keys=True).encode())
    return digest.hexdigest()


def run(*args: str, nproc: int = 1) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    subprocess.run([*launcher, "-m", *args], env=env, check=True, capture_output=True, text=True)


def digest_extraction(work: Path) -> dict[str, str]:
    from pipeline.kit.sample_data import make_sample_data
    from pipeline.kit.tiny_model import make_tiny_model

    model = make_tiny_model(work / "tiny-model", seed=0)
    out: dict[str, str] = {}
    for task, jsonl in sorted(make_sample_data(work / "sample-data", samples=8).items()):
        target = work / "shards" / task
        run("pipeline.extract", str(jsonl), "--output_dir", str(target), "--model_path", str(model),
            "--max_samples_per_shard", "3", "--batching", "exact")  # fmt: skip
        for file in sorted(target.rglob("*")):
            relative = file.relative_to(work).as_posix()
            if not file.is_file() or "/_progress/" in f"/{relative}":
                continue
            if file.name == "manifest.json":
                manifest = json.loads(file.read_text())
                manifest.get("model", {}).pop("path", None)
                manifest.pop("created", None)  # the time of the run
                out[relative] = json.dumps(manifest, sort_keys=True)
            else:
                out[relative] = sha256(file)
    return out


def digest_training(work: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, flags in TRAININGS.items():
        folder = work / "runs" / name
        nproc = 2 if name.startswith("fsdp") else 1
        run("pipeline.train", "--pretrained_model_name_or_path", str(work / "tiny-model"),
            "--train_data_meta_dir", str(work / "shards"), "--output_dir", str(folder), "--train_batch_size", "1",
            "--image_sample_size", "64", "--seed", "3", "--report_to", "none", "--max_train_steps", "4",
            "--checkpointing_steps", "2", *flags, nproc=nproc)  # fmt: skip
        for file in sorted(folder.rglob("*")):
            relative = file.relative_to(work).as_posix()
            in_run = file.parent == folder and file.suffix == ".safetensors"
            kept = "checkpoint-" in relative or "/transformer/" in relative or in_run
            if file.is_file() and kept and not file.name.startswith(SKIPPED):
                out[relative] = sha256(file)
        summary = json.loads((folder / "run_summary.json").read_text())
        out[f"runs/{name}/final_loss"] = repr(summary["final_loss"])
    return out


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    for key in differ:
        print(f"DIFFERS {key}\n  before {a.get(key)}\n  after  {b.get(key)}")
    print(f"{len(set(a) | set(b)) - len(differ)} equal, {len(differ)} differ")
    return 1 if differ else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", type=Path, default=Path("/tmp/parity"))
    p.add_argument("--out", type=Path, help="where to write the digests (JSON)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="compare two digest files")
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("give --out FILE (or --compare BEFORE AFTER)")
    import shutil

    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    digests = {**digest_extraction(args.work_dir), **digest_training(args.work_dir)}
    args.out.write_text(json.dumps(digests, indent=1, sort_keys=True))
    print(f"{len(digests)} digests written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
