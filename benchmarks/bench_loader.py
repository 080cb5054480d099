"""Training loader vs the original tool's layout, on the same synthetic data and worker count.

    python benchmarks/bench_loader.py --samples 96 --workers 2 --steps 60

Writes one realistic task twice: as shards (this project) and in the original
layout (JSONL + one ``.pt`` per embedding + image files).  Hidden size 3584,
250-800 tokens per embedding, six variants, 512-1024 px JPEG/PNG images.  Page
cache is dropped for the dataset files (posix_fadvise DONTNEED) before each
measurement.  Prints samples/s and MB/s of both loaders and their ratio, bytes
read per sample vs bytes the batch uses, peak RSS per worker, and time to the
first batch when resuming at step 0 vs at a late step.

``--store_url gs://bkt/bench`` (or ``s3://…``) also uploads the shards there and
measures our loader reading them by byte ranges from that store (credentials
and endpoint from the environment or ``--storage_options``); ``--gcs_emulator``
starts a local GCS emulator for it (fake-gcs-server), so stores can be compared:

    python benchmarks/bench_loader.py --samples 24 --steps 20 --gcs_emulator --store_url gs://bench/shards
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.crops import crop_size
from pipeline.shards.format import VARIANTS
from pipeline.train.stream.dataset import MixedBatchDataset

SUPPORT = Path(__file__).resolve().parents[1] / "tests" / "support"  # the test servers (range, GCS)

HIDDEN = 3584


def drop_cache(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def make_image(rng: np.random.Generator) -> tuple[bytes, str, tuple[int, int]]:
    w, h = (int(x) for x in rng.integers(512, 1025, size=2))
    base = rng.integers(0, 255, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    fmt = "JPEG" if rng.random() < 0.5 else "PNG"
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue(), "jpg" if fmt == "JPEG" else "png", (w, h)


def build(root: Path, samples: int, train_copy_size: int = 0) -> tuple[Path, Path]:
    """Shards + manifest under root/shards/task (with training copies for ``train_copy_size``, as
    ``extract --train_copy_size`` writes them), original layout under root/legacy."""
    from pipeline.common.images import aspect_bucket, open_rgb
    from pipeline.shards.copies import add_train_copies
    from pipeline.shards.format import TarShardWriter, embedding_to_npy, index_name, new_manifest, sample_members

    shard_dir, legacy = root / "shards" / "task", root / "legacy"
    (shard_dir / "src1").mkdir(parents=True)
    (legacy / "emb").mkdir(parents=True)
    (legacy / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    manifest = new_manifest("task", {"path": "synthetic", "hidden_size": HIDDEN}, "diffusers", {"edit": 64, "t2i": 34})
    rows, per_shard = [], 16
    for first in range(0, samples, per_shard):
        seq = first // per_shard
        url = f"src1/00000-{seq:06d}.tar"
        writer = TarShardWriter(str(shard_dir / url))
        for i in range(first, min(samples, first + per_shard)):
            key = f"data-{i:09d}"
            (src, src_ext, src_size), (tgt, tgt_ext, tgt_size) = make_image(rng), make_image(rng)
            embs = {v: torch.randn(int(rng.integers(250, 801)), HIDDEN).bfloat16() for v in VARIANTS}
            meta = {
                "key": key,
                "line": i,
                "num_sources": 1,
                "instruction": "make it so",
                "instruction_cn": "照做",
                "inverse_instruction": "undo",
                "inverse_instruction_cn": "撤销",
                "sources": [{"member": f"source0.{src_ext}", "size": list(src_size)}],
                "target": {"member": f"target.{tgt_ext}", "size": list(tgt_size)},
                "bucket": [aspect_bucket(src_size), aspect_bucket(tgt_size)],
                "variants": {v: list(e.shape) for v, e in embs.items()},
            }
            images = {"target": (tgt_ext, tgt), "source0": (src_ext, src)}
            if train_copy_size:  # from the stored bytes, as extraction does
                add_train_copies(meta, images, {r: open_rgb(data) for r, (_, data) in images.items()}, train_copy_size)
            writer.add(key, sample_members(meta, images, {v: embedding_to_npy(e) for v, e in embs.items()}))
            (legacy / "img" / f"{key}_src.{src_ext}").write_bytes(src)
            (legacy / "img" / f"{key}_tgt.{tgt_ext}").write_bytes(tgt)
            row = {
                "source_image": f"img/{key}_src.{src_ext}",
                "edit_image": f"img/{key}_tgt.{tgt_ext}",
                "instruction": "make it so",
                "instruction_cn": "照做",
                "inverse_instruction": "undo",
                "inverse_instruction_cn": "撤销",
                "source_image_size": list(src_size),
                "edit_image_size": list(tgt_size),
            }
            for v, e in embs.items():
                torch.save(e.clone(), legacy / "emb" / f"{key}_{v}.pt")
                row[f"embeddings_tensor_{v.replace('drop', 'droptext')}"] = f"emb/{key}_{v}.pt"
            rows.append(row)
        size, digest = writer.close()
        index = json.dumps({"shard": url, "samples": writer.index})
        (shard_dir / index_name(url)).write_text(index)
        manifest["shards"].append(
            {
                "url": url,
                "num_sources": 1,
                "samples": len(writer),
                "bytes": size,
                "sha256": digest,
                "index": index_name(url),
            }
        )
    manifest["variants"] = list(VARIANTS)
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    (legacy / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return shard_dir.parent, legacy


class LegacyDataset(Dataset):
    """The original tool's reading pattern: a JSONL row, its images, one .pt for the chosen text."""

    def __init__(self, legacy: Path, image_sample_size: int, seed: int):
        self.root = legacy
        self.rows = [json.loads(x) for x in (legacy / "meta.jsonl").read_text().splitlines()]
        self.size, self.seed = image_sample_size, seed
        self.bytes_read = 0

    def __len__(self):
        return 10**9

    def __getitem__(self, idx):
        from pipeline.common import images as imaging

        row = self.rows[idx % len(self.rows)]
        rng = np.random.default_rng([self.seed, idx])
        field = ["embeddings_tensor_en", "embeddings_tensor_cn"][int(rng.integers(2))]
        paths = [self.root / row["source_image"], self.root / row["edit_image"], self.root / row[field]]
        self.bytes_read += sum(p.stat().st_size for p in paths)
        emb = torch.load(paths[2], weights_only=True)
        imgs = [imaging.open_rgb(p.read_bytes()) for p in paths[:2]]
        size = crop_size(imgs[1].width / imgs[1].height, self.size**2)
        tensors = [torch.from_numpy(np.asarray(imaging.resize_and_crop(i, size, (0.5, 0.5)))) for i in imgs]
        return {
            "emb": emb,
            "images": tensors,
            "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "bytes": self.bytes_read,
        }


def private_kb() -> int:
    """This process's own memory (Private_Clean + Private_Dirty of /proc/self/smaps_rollup): what it adds to the
    machine, without the pages it shares with the parent it was forked from (torch's libraries)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
        return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))
    except (OSError, KeyError, ValueError):
        return 0


class Measured(MixedBatchDataset):
    """Our dataset, each batch carrying the worker's memory and bytes read."""

    def __iter__(self):
        for batch in super().__iter__():
            batch["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            # /proc/self/smaps_rollup costs ~20 ms with torch mapped: sampled every 16th batch of this worker
            batch["uss_kb"] = private_kb() if self.made % 16 == 1 else 0
            batch["bytes"] = self.reader.bytes_read
            yield batch


def run_ours(
    shards_root, workers: int, steps: int, state=None, want_state_at=None, storage_options=None, streams: int = 1
):
    from torchdata.stateful_dataloader import StatefulDataLoader

    from pipeline.shards.tasks import discover_tasks
    from pipeline.train.config.data import StreamConfig
    from pipeline.train.stream.mix import plan_mix

    if str(shards_root).startswith("http"):  # no listing over HTTP: the shards by pattern
        from pipeline.shards.tasks import task_from_patterns

        count = len(list((LOCAL_SHARDS / "task" / "src1").glob("*.tar")))
        pattern = f"{shards_root}/task/src1/00000-{{000000..{count - 1:06d}}}.tar"
        tasks = {"task": task_from_patterns("task", [pattern], storage_options)}
    else:
        tasks = discover_tasks(str(shards_root), storage_options)
    if streams > 1:  # the same shards as many tasks: per-stream state (orders, pools, read-ahead) × streams
        from pipeline.shards.tasks import task_from_patterns

        count = len(list((Path(shards_root) / "task" / "src1").glob("*.tar")))
        pattern = f"{shards_root}/task/src1/00000-{{000000..{count - 1:06d}}}.tar"
        tasks = {f"task{i:03d}": task_from_patterns(f"task{i:03d}", [pattern], None) for i in range(streams)}
    plan = plan_mix(tasks, dict.fromkeys(tasks, 1.0), {"1": 1})
    config = StreamConfig(
        batch_size=1,
        seed=1,
        shuffle_buffer=8,
        image_sample_size=512,
        storage_options=storage_options,
        readahead_bytes=int(READAHEAD_MB * (1 << 20)),
    )
    dataset = Measured(tasks, plan, 0, 1, config)
    loader = StatefulDataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        multiprocessing_context=START_METHOD if workers else None,
    )
    if state is not None:
        loader.load_state_dict(state)
    t0 = time.perf_counter()
    first, rss, used, read_by_worker, saved = None, {}, 0, {}, None
    uss: dict[int, int] = {}
    for i, batch in enumerate(loader):
        if first is None:
            first = time.perf_counter() - t0
            steady = time.perf_counter()
        worker = batch["step"] % max(workers, 1)
        rss[worker] = max(rss.get(worker, 0), batch["rss_kb"])
        uss[worker] = max(uss.get(worker, 0), batch["uss_kb"])
        read_by_worker[worker] = batch["bytes"]
        used += batch["prompt_embeds"].numel() * 2 + batch["target"].numel() + sum(s.numel() for s in batch["sources"])
        if want_state_at is not None and i + 1 == want_state_at:
            saved = json.loads(json.dumps(loader.state_dict()))
        if i + 1 >= steps:
            break
    # steady state: the batches after the first (start-up — worker processes, imports — is reported apart)
    per_batch = (time.perf_counter() - steady) / max(steps - 1, 1)
    global LAST_USS
    LAST_USS = uss
    return per_batch, first, rss, sum(read_by_worker.values()), used, saved


def run_legacy(legacy: Path, workers: int, steps: int):
    loader = DataLoader(
        LegacyDataset(legacy, 512, 1),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        shuffle=False,
    )
    rss, read_by_worker = {}, {}
    for i, item in enumerate(loader):
        if i == 0:
            steady = time.perf_counter()
        worker = i % max(workers, 1)
        rss[worker] = max(rss.get(worker, 0), item["rss_kb"])
        read_by_worker[worker] = item["bytes"]
        if i + 1 >= steps:
            break
    return (time.perf_counter() - steady) / max(steps - 1, 1), rss, sum(read_by_worker.values())


class IdleDataset(Dataset):
    """Batches of nothing: a worker's memory floor (torch imported, forked from this process)."""

    def __len__(self):
        return 10**9

    def __getitem__(self, idx):
        return {"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "uss_kb": private_kb() if idx < 4 else 0}


def run_idle(workers: int, steps: int) -> tuple[dict[int, int], dict[int, int]]:
    """Peak RSS and private memory per worker of a loader that reads and decodes nothing."""
    loader = DataLoader(IdleDataset(), batch_size=None, num_workers=max(workers, 1), prefetch_factor=2)
    rss, uss = {}, {}
    for i, item in enumerate(loader):
        worker = i % max(workers, 1)
        rss[worker] = max(rss.get(worker, 0), item["rss_kb"])
        uss[worker] = max(uss.get(worker, 0), item["uss_kb"])
        if i + 1 >= steps:
            break
    return rss, uss


def run_from_store(shards_root: Path, args, local_time: float) -> dict:
    """Upload the shards to ``--store_url`` and run our loader from there; figures next to the local run's."""
    import fsspec

    from pipeline.shards.storage import options_for, parse_storage_options

    emulator = None
    if args.gcs_emulator:
        sys.path.insert(0, str(SUPPORT))
        from gcs_emulator import GCSEmulator

        emulator = GCSEmulator()
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        emulator.create_bucket(args.store_url.split("://", 1)[1].split("/", 1)[0])
    try:
        storage_options = parse_storage_options(args.storage_options, args.store_url)
        protocol = args.store_url.split("://", 1)[0]
        fs = fsspec.filesystem(protocol, **options_for(args.store_url, storage_options))
        fs.put(str(shards_root), args.store_url.split("://", 1)[1], recursive=True)
        store_time, first, rss, read, _, _ = run_ours(
            args.store_url, args.workers, args.steps, storage_options=storage_options
        )
    finally:
        if emulator is not None:
            emulator.stop()
    return {
        "store": args.store_url + (" (local fake-gcs-server)" if emulator else ""),
        "store_samples_per_s": round(1 / store_time, 2),
        "store_over_local_speed_ratio": round(local_time / store_time, 2),
        "store_MB_read_per_sample": round(read / 1e6 / args.steps, 2),
        "store_peak_rss_MB_per_worker": {k: round(v / 1024) for k, v in sorted(rss.items())},
        "store_first_batch_s": round(first, 2),
    }


LOCAL_SHARDS = Path()
START_METHOD: str | None = None  # DataLoader workers: fork (default), forkserver or spawn
LAST_USS: dict[int, int] = {}
READAHEAD_MB = 64.0


def run_behind_latency(shards_root: Path, args) -> dict:
    """Our loader over HTTP range reads from a local server, without and with ``--latency_ms`` per request."""
    import subprocess

    global LOCAL_SHARDS
    LOCAL_SHARDS = shards_root
    times = {}
    for delay in (0.0, args.latency_ms):
        server = subprocess.Popen(
            [sys.executable, str(SUPPORT / "range_server.py"), str(shards_root), "--delay_ms", str(delay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            url = server.stdout.readline().strip()
            times[delay], _, _, _, _, _ = run_ours(url, args.workers, args.steps)
        finally:
            server.stdin.close()
            server.wait(timeout=30)
    return {
        "http_samples_per_s": round(1 / times[0.0], 2),
        f"http_{args.latency_ms:g}ms_samples_per_s": round(1 / times[args.latency_ms], 2),
        f"latency_{args.latency_ms:g}ms_ratio": round(times[0.0] / times[args.latency_ms], 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--work_dir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--store_url", default=None, help="also measure reading the shards from this object-store URL")
    p.add_argument("--storage_options", default=None, help="JSON fsspec options for --store_url")
    p.add_argument("--gcs_emulator", action="store_true", help="start a local GCS emulator for a gs:// --store_url")
    p.add_argument(
        "--latency_ms",
        type=float,
        default=0.0,
        help="also read the shards over HTTP from a local range server, without and with this delay per request",
    )
    p.add_argument(
        "--train_copy_size",
        type=int,
        default=512,
        help="write the shards with training copies for this size, as extract --train_copy_size does "
        "(0: originals only; the original layout always has originals only)",
    )
    p.add_argument(
        "--start_method",
        choices=["fork", "forkserver", "spawn"],
        default=None,
        help="how our loader's workers start (default: fork, as training does)",
    )
    p.add_argument("--readahead_mb", type=float, default=64.0, help="our loader's read-ahead per worker (0: off)")
    p.add_argument(
        "--warm",
        action="store_true",
        help="keep the page cache (default: drop the files from it before each run, so reads come from the disk)",
    )
    p.add_argument(
        "--streams",
        default="",
        help="also measure worker memory with the shards registered as this many tasks, e.g. 8,200 (streams)",
    )
    args = p.parse_args()
    if args.warm:
        global drop_cache

        def drop_cache(root: Path) -> None:  # noqa: F811 - --warm: measure the CPU work, not the disk
            return None

    global READAHEAD_MB, START_METHOD
    READAHEAD_MB, START_METHOD = args.readahead_mb, args.start_method
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-loader-"))
    if not (root / "shards").exists():
        shards_root, legacy = build(root, args.samples, args.train_copy_size)
        (root / "train_copy_size").write_text(str(args.train_copy_size))
    else:  # a kept --work_dir: its data as built then
        shards_root, legacy = root / "shards", root / "legacy"
        args.train_copy_size = int((root / "train_copy_size").read_text()) if (root / "train_copy_size").exists() else 0
    total_bytes = sum(f.stat().st_size for f in (root / "shards").rglob("*") if f.is_file())

    drop_cache(root)
    legacy_time, legacy_rss, legacy_read = run_legacy(legacy, args.workers, args.steps)
    drop_cache(root)
    ours_time, first0, ours_rss, ours_read, used, state = run_ours(
        shards_root, args.workers, args.steps, want_state_at=args.steps // 2
    )
    drop_cache(root)
    ours_uss = dict(LAST_USS)
    _, first_late, _, _, _, _ = run_ours(shards_root, args.workers, 1, state=state)
    idle_rss, idle_uss = run_idle(args.workers, 8) if args.workers else ({}, {})  # 0 workers: no worker
    result = {
        "samples_in_dataset": args.samples,
        "dataset_GB": round(total_bytes / 1e9, 2),
        "steps": args.steps,
        "workers": args.workers,
        "train_copy_size": args.train_copy_size,
        "ours_samples_per_s": round(1 / ours_time, 2),
        "legacy_samples_per_s": round(1 / legacy_time, 2),
        "speed_ratio_ours_over_legacy": round(legacy_time / ours_time, 2),
        "ours_MB_per_s": round(ours_read / 1e6 / (ours_time * args.steps), 1),
        "legacy_MB_per_s": round(legacy_read / 1e6 / (legacy_time * args.steps), 1),
        "ours_MB_read_per_sample": round(ours_read / 1e6 / args.steps, 2),
        "legacy_MB_read_per_sample": round(legacy_read / 1e6 / args.steps, 2),
        "MB_used_per_sample": round(used / 1e6 / args.steps, 2),
        "read_over_used": round(ours_read / max(used, 1), 2),
        "peak_rss_MB_per_worker_ours": {k: round(v / 1024) for k, v in sorted(ours_rss.items())},
        "peak_rss_MB_per_worker_legacy": {k: round(v / 1024) for k, v in sorted(legacy_rss.items())},
        "peak_private_MB_per_worker_ours": {k: round(v / 1024) for k, v in sorted(ours_uss.items())},
        # the floor: a worker forked from this process that reads and decodes nothing
        "peak_rss_MB_per_worker_idle": {k: round(v / 1024) for k, v in sorted(idle_rss.items())},
        "peak_private_MB_per_worker_idle": {k: round(v / 1024) for k, v in sorted(idle_uss.items())},
        "first_batch_s_fresh": round(first0, 2),
        f"first_batch_s_resumed_at_step_{args.steps // 2}": round(first_late, 2),
        "resume_ratio": round(first_late / first0, 2),
    }
    for count in [int(x) for x in args.streams.split(",") if x]:
        _, _, rss, _, _, _ = run_ours(shards_root, args.workers, args.steps, streams=count)
        result[f"streams_{count}_peak_rss_MB_per_worker"] = {k: round(v / 1024) for k, v in sorted(rss.items())}
        private = {k: round(v / 1024) for k, v in sorted(LAST_USS.items())}
        result[f"streams_{count}_peak_private_MB_per_worker"] = private
    if args.latency_ms:
        result.update(run_behind_latency(shards_root, args))
    if args.store_url:
        result.update(run_from_store(shards_root, args, ours_time))
    print(json.dumps(result, indent=1))
    if not args.keep and not args.work_dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
