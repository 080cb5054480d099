"""This tree's training loader against another revision's, on the same data, in the same run.

    python benchmarks/compare_loader.py --baseline fd5e010 --samples 48 --steps 100 --rounds 2

For each setting (DataLoader workers 0 and 2; shards with training copies for 512
and without), both revisions run ``benchmarks/bench_loader.py`` on one shared
dataset, alternating (baseline, this tree, baseline, …) so that drift of the
machine hits both alike. Each revision imports its own ``pipeline`` package (the
baseline is exported with ``git archive`` and put first on ``PYTHONPATH``).
Prints, per setting, both loaders' samples/s and peak private memory per worker
(the median over rounds) and the ratio this tree / baseline: a restructuring of
the stream should keep the ratio at about 1 or above.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export(revision: str, into: Path) -> Path:
    """The files of ``revision`` (a commit, tag or branch of this repository) under ``into``."""
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def bench(tree: Path, data: Path, workers: int, steps: int, copies: int, samples: int) -> dict:
    """One ``bench_loader.py`` run of ``tree`` on ``data`` (built on the first call); its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(tree / "benchmarks" / "bench_loader.py"), "--work_dir", str(data), "--keep"]
    command += ["--workers", str(workers), "--steps", str(steps), "--train_copy_size", str(copies)]
    command += ["--samples", str(samples)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=tree).stdout
    return json.loads(out[out.index("{") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="the revision to compare with (commit, tag or branch)")
    p.add_argument("--samples", type=int, default=48, help="samples in the synthetic dataset")
    p.add_argument("--steps", type=int, default=100, help="batches each run reads")
    p.add_argument("--rounds", type=int, default=2, help="runs of each revision per setting (the median is kept)")
    p.add_argument("--workers", default="0,2", help="DataLoader worker counts to compare")
    p.add_argument("--copies", default="512,0", help="--train_copy_size values of the data (0: originals only)")
    p.add_argument("--this_first", action="store_true", help="run this tree first in each round (order effects)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="compare-loader-"))
    try:
        baseline = export(args.baseline, work / "baseline")
        rows = []
        for copies in [int(c) for c in args.copies.split(",")]:
            data = work / f"data-{copies}"
            for workers in [int(w) for w in args.workers.split(",")]:
                runs: dict[str, list[dict]] = {"baseline": [], "this": []}
                for _ in range(args.rounds):
                    order = (("baseline", baseline), ("this", ROOT))
                    for name, tree in order[::-1] if args.this_first else order:
                        runs[name].append(bench(tree, data, workers, args.steps, copies, args.samples))
                rate = {k: statistics.median(r["ours_samples_per_s"] for r in v) for k, v in runs.items()}
                private = {
                    k: statistics.median(max(r["peak_private_MB_per_worker_ours"].values(), default=0) for r in v)
                    for k, v in runs.items()
                }
                rows.append(
                    {
                        "train_copy_size": copies,
                        "workers": workers,
                        "baseline_samples_per_s": rate["baseline"],
                        "this_samples_per_s": rate["this"],
                        "speed_ratio_this_over_baseline": round(rate["this"] / rate["baseline"], 2),
                        "baseline_peak_private_MB_per_worker": private["baseline"],
                        "this_peak_private_MB_per_worker": private["this"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
