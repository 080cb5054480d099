"""Test helpers: run the CLIs, read what they wrote with webdataset."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import webdataset as wds
from webdataset.gopen import gopen_schemes

from pipeline.kit.sample_data import combined_jsonl  # noqa: F401  (re-exported for tests)


def encode_image(img, fmt: str, orientation: int | None = None, quality: int = 90) -> bytes:
    """``img`` (PIL) as PNG or JPEG bytes, with an EXIF orientation tag when given."""
    import io

    from PIL import Image

    buf, kwargs = io.BytesIO(), {"quality": quality} if fmt == "JPEG" else {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


REPO = Path(__file__).resolve().parents[2]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _catches_sigusr1(pid: int) -> bool:
    """Whether ``pid`` handles SIGUSR1 (our CLIs dump their stacks on it; for others it is fatal)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (signal.SIGUSR1 - 1) & 1)


def _wait_for_dump(pid: int, limit: float = 3.0) -> None:
    """Wait until ``pid`` has taken its SIGUSR1 and gone back to waiting, so that the next process's stacks
    follow its stacks on the shared stderr instead of being interleaved with them line by line (the handler
    writes in many small pieces). ``limit`` bounds a process that never sleeps again (a busy loop)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            status = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
            )
        except OSError:
            return  # gone: nothing more will come from it
        pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
        if not pending >> (signal.SIGUSR1 - 1) & 1 and status["State"].split()[0] != "R":
            return
        time.sleep(0.02)


def run_bounded(cmd: list[str], env: dict, timeout: float, cwd: str | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)`` with captured text output; past ``timeout`` every process of the tree that can
    prints its Python stacks (SIGUSR1) before all are killed, and the test fails with those stacks: a hang in CI
    says where it waited."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [proc.pid, *_descendants(proc.pid)]
        for pid in tree:
            if _catches_sigusr1(pid):
                os.kill(pid, signal.SIGUSR1)
                _wait_for_dump(pid)
        for pid in reversed(tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(cmd[:8])} ... ran past {timeout} s; stacks of its processes follow\n{out[-4000:]}\n"
            f"{err[-30000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 600, check: bool = False):
    """Run ``python -m module args`` in a fresh process (as a user would)."""
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    result = run_bounded([sys.executable, "-m", module, *args], full_env, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} exited {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


def torchrun(nproc: int, module: str, *args: str, env: dict | None = None, timeout: int = 900, check: bool = True):
    """``torchrun --standalone --nproc_per_node=N -m module args`` on CPU; fails the test on a non-zero exit
    unless ``check`` is False."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = run_bounded([*cmd, *args], full_env, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun {module} exited {result.returncode}\n{result.stderr[-4000:]}")
    return result


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_nodes(module: str, *args: str, nproc: int = 1, cwds: tuple | None = None, timeout: int = 900):
    """Two torchrun launchers on this machine, ``--nnodes 2 --node_rank 0/1`` with a rendezvous on 127.0.0.1, ``nproc``
    processes each: two nodes to every line of our code. ``cwds``: each node's own working folder (a relative path
    then names a different folder on each). Returns both launchers' results (node 0 first)."""
    import threading

    port = free_port()
    results: list = [None, None]

    def node(rank: int) -> None:
        launcher = ["--nnodes=2", f"--node_rank={rank}", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--master_port={port}", "-m", module, *args]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        cwd = str(cwds[rank]) if cwds else None
        try:
            results[rank] = run_bounded(cmd, env, timeout, cwd=cwd)
        except AssertionError as exc:  # a hang: its stacks, for the test to fail with
            results[rank] = exc

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, AssertionError):
            raise result
    return results


def extract(jsonl, out_dir, model_dir, *extra: str, env: dict | None = None, check: bool = True):
    return run_module(
        "pipeline.extract",
        str(jsonl),
        "--output_dir",
        str(out_dir),
        "--model_path",
        str(model_dir),
        "--num_workers",
        "0",
        *extra,
        env=env,
        check=check,
    )


def read_manifest(task_url: str, **storage_options) -> dict:
    with fsspec.open(f"{task_url}/manifest.json", "rb", **storage_options) as handle:
        return json.loads(handle.read())


def read_samples(task_url: str, **storage_options) -> dict[str, dict[str, bytes]]:
    """Every sample of a task, read with webdataset from the manifest's shard URLs."""
    manifest = read_manifest(task_url, **storage_options)
    urls = [f"{task_url}/{s['url']}" for s in manifest["shards"]]
    if not urls:
        return {}
    # webdataset has no s3 opener of its own and pipes gs:// through gsutil; give it fsspec's for both
    for scheme in ("s3", "gs"):
        gopen_schemes[scheme] = lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open()
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample.pop("__key__")
        sample.pop("__url__", None)
        sample.pop("__local_path__", None)
        assert key not in samples, f"duplicate key {key}"
        samples[key] = sample
    return samples


# PixArt-α's ASPECT_RATIO_512 as (h/w key, height, width), written out independently of pipeline.common.images
PIXART_512 = [
    ("0.25", 256, 1024), ("0.26", 256, 992), ("0.27", 256, 960), ("0.28", 256, 928), ("0.32", 288, 896),
    ("0.33", 288, 864), ("0.35", 288, 832), ("0.4", 320, 800), ("0.42", 320, 768), ("0.48", 352, 736),
    ("0.5", 352, 704), ("0.52", 352, 672), ("0.57", 384, 672), ("0.6", 384, 640), ("0.68", 416, 608),
    ("0.72", 416, 576), ("0.78", 448, 576), ("0.82", 448, 544), ("0.88", 480, 544), ("0.94", 480, 512),
    ("1.0", 512, 512), ("1.07", 512, 480), ("1.13", 544, 480), ("1.21", 544, 448), ("1.29", 576, 448),
    ("1.38", 576, 416), ("1.46", 608, 416), ("1.67", 640, 384), ("1.75", 672, 384), ("2.0", 704, 352),
    ("2.09", 736, 352), ("2.4", 768, 320), ("2.5", 800, 320), ("2.89", 832, 288), ("3.0", 864, 288),
    ("3.11", 896, 288), ("3.62", 928, 256), ("3.75", 960, 256), ("3.88", 992, 256), ("4.0", 1024, 256),
]  # fmt: skip


def firered_reference_conditions(images, target_size, image_sample_size: int = 512):
    """The original tool's condition images, step by step as the issue describes it, with torchvision."""
    import math

    from PIL import Image
    from torchvision import transforms

    w, h = target_size
    _, eh, ew = min(PIXART_512, key=lambda row: abs(float(row[0]) - h / w))
    crop = [int(eh / 512 * image_sample_size / 16) * 16, int(ew / 512 * image_sample_size / 16) * 16]
    resize = (crop[0], int(w * crop[0] / h)) if crop[0] / h > crop[1] / w else (int(h * crop[1] / w), crop[1])
    fit = transforms.Compose(
        [transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(crop)]
    )
    ratio = crop[1] / crop[0]
    width = math.sqrt(384 * 384 * ratio)
    size = (round(width / 32) * 32, round(width / ratio / 32) * 32)
    return [fit(img).resize(size, Image.Resampling.LANCZOS) for img in images]


def child_pids(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still exist and are not zombies."""
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def synthetic_task(
    root,
    name: str,
    samples: int,
    per_shard: int,
    bucket_of=None,
    hidden: int = 8,
    image_bytes: bytes | None = None,
    tokens_of=None,
    embedding_of=None,
):
    """A task of ``samples`` single-source samples with tiny images and embeddings, written directly (no model).

    ``bucket_of(i)`` gives sample i's bucket tuple (default: all in one bucket); ``image_bytes`` replaces every
    image (e.g. bytes no decoder accepts); ``tokens_of(i)`` sample i's prompt length (default 4);
    ``embedding_of(i)`` sample i's embedding tensor when not None (default: filled with i). Returns the task folder.
    """
    import io as _io

    import torch as _torch
    from PIL import Image as _Image

    from pipeline.shards.format import TarShardWriter, embedding_to_npy, index_name, new_manifest, sample_members

    task_dir = Path(root) / name
    (task_dir / "src1").mkdir(parents=True)
    manifest = new_manifest(name, {"path": "synthetic", "hidden_size": hidden}, "diffusers", {"edit": 64, "t2i": 34})
    for first in range(0, samples, per_shard):
        url = f"src1/00000-{first // per_shard:06d}.tar"
        writer = TarShardWriter(str(task_dir / url))
        for i in range(first, min(samples, first + per_shard)):
            key = f"s-{i:07d}"
            buf = _io.BytesIO()
            _Image.new("RGB", (16, 16), (i % 256, 0, 0)).save(buf, format="PNG")
            png = buf.getvalue() if image_bytes is None else image_bytes
            tokens = tokens_of(i) if tokens_of else 4
            own = embedding_of(i) if embedding_of else None
            emb = (_torch.full((tokens, hidden), float(i)) if own is None else own).bfloat16()
            meta = {
                "key": key,
                "line": i,
                "num_sources": 1,
                "instruction": f"edit {i}",
                "sources": [{"member": "source0.png", "size": [16, 16]}],
                "target": {"member": "target.png", "size": [16, 16]},
                "bucket": list(bucket_of(i)) if bucket_of else [1.0, 1.0],
                "variants": {"en": list(emb.shape), "drop": list(emb.shape)},
            }
            members = sample_members(
                meta,
                {"target": ("png", png), "source0": ("png", png)},
                {"en": embedding_to_npy(emb), "drop": embedding_to_npy(emb)},
            )
            writer.add(key, members)
        size, digest = writer.close()
        (task_dir / index_name(url)).write_text(json.dumps({"shard": url, "samples": writer.index}))
        manifest["shards"].append(
            {"url": url, "num_sources": 1, "samples": len(writer), "bytes": size, "sha256": digest,
             "index": index_name(url)}
        )  # fmt: skip
    manifest["variants"] = ["en", "drop"]
    (task_dir / "manifest.json").write_text(json.dumps(manifest))
    return task_dir


class PickleBomb:
    """Unpickling this creates the file ``path``: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def no_traceback_of_ours(stderr: str) -> bool:
    """No frame of this project's code in a traceback (a launcher's own report of a failed child is allowed)."""
    return not any(line.strip().startswith('File "') and "/pipeline/" in line for line in stderr.splitlines())


# --- training runs (the trainer's CLI on the tiny model) ---------------------------------------------

TRAIN_BASE = [
    "--train_batch_size",
    "1",
    "--image_sample_size",
    "64",
    "--dataloader_num_workers",
    "1",
    "--seed",
    "3",
    "--report_to",
    "none",
]


def train(model_dir, meta, out, *extra, env=None, nproc: int = 1):
    args = [
        "--pretrained_model_name_or_path",
        str(model_dir),
        "--train_data_meta_dir",
        str(meta),
        "--output_dir",
        str(out),
        *TRAIN_BASE,
        *extra,
    ]
    if nproc == 1:
        return run_module("pipeline.train", *args, env=env, check=True)
    return torchrun(nproc, "pipeline.train", *args, env=env)


def transformer_weights(folder: Path) -> dict:
    """Every tensor of a diffusers weights folder (all its safetensors files), by name."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def generate_edit(pipe):
    """One small edit through a diffusers pipeline, deterministic: what a loaded LoRA or transformer changes."""
    import torch
    from PIL import Image

    return pipe(
        image=[Image.new("RGB", (64, 48), (200, 40, 40))],
        prompt="Make it blue.",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
