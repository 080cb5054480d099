"""Shared fixtures: one tiny model and one sample dataset per test session."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

# fixtures shared by a unit and an integration module (tests/support/)
pytest_plugins = ["hostile_tars", "copy_checks"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one compute thread per process, here and in every CLI a test starts: the suite already runs two pytest processes
# on two cores, each often beside a CLI of its own, so a second OpenMP thread per process only spins waiting for a
# core (13 % of the CPU time of the training tests measured here); torchrun sets the same for its ranks
os.environ.setdefault("OMP_NUM_THREADS", "1")


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` once per test session, shared by the xdist worker processes (a file lock; the finished
    folder is marked by ``NAME.built`` beside it). Without xdist the folder is this process's own."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # this session's folder, above each worker's basetemp
    folder = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (shared / f"{name}.built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (shared / f"{name}.built").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from pipeline.kit.tiny_model import make_tiny_model

    return built_once(tmp_path_factory, "tiny-model", lambda folder: make_tiny_model(folder, seed=0))


@pytest.fixture(scope="session")
def tiny_2511_dir(tmp_path_factory):
    """The tiny model in the Qwen-Image-Edit-2511 layout (zero_cond_t); same seed, so the same text encoder."""
    from pipeline.kit.tiny_model import make_tiny_model

    return built_once(tmp_path_factory, "tiny-2511", lambda folder: make_tiny_model(folder, seed=0, variant="2511"))


@pytest.fixture(scope="session")
def tiny_21_dir(tmp_path_factory):
    """The tiny Qwen-Image 2.1 (Qwen3-VL encoder, single-stream DiT, RGBA VAE), seeded."""
    from pipeline.families.qwen_image21.tiny import make_tiny_model

    return built_once(tmp_path_factory, "tiny-21", lambda folder: make_tiny_model(folder, seed=0))


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory):
    from pipeline.kit.sample_data import make_sample_data

    return built_once(tmp_path_factory, "sample-data", lambda folder: make_sample_data(folder, samples=12, seed=0))


@pytest.fixture
def small_vae_inputs(monkeypatch):
    """Edit-Plus resizes VAE inputs to ~1024² whatever the request; shrink that for CPU tests."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", 64 * 64)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """AWS_* variables a user would export, set for this process and its children; a fresh bucket."""
    import uuid

    import s3fs

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = f"bkt-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    env["BUCKET"] = bucket
    return env


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS emulator (fake-gcs-server) on 127.0.0.1; yields it (``.url``, ``.create_bucket``)."""
    from gcs_emulator import GCSEmulator

    server = GCSEmulator()
    yield server
    server.stop()


@pytest.fixture
def gcs_env(gcs_server, monkeypatch):
    """What a GCS user exports to reach an emulator, set for this process and its children; a fresh bucket."""
    import uuid

    env = {"STORAGE_EMULATOR_HOST": gcs_server.url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = f"bkt-{uuid.uuid4().hex[:10]}"
    gcs_server.create_bucket(bucket)
    env["BUCKET"] = bucket
    return env


@dataclass
class ObjectStore:
    """One object store of a parametrised test: its scheme, a fresh bucket, the environment that reaches it."""

    scheme: str
    bucket: str
    env: dict[str, str]
    endpoint: str

    def url(self, *parts: str) -> str:
        return "/".join([f"{self.scheme}://{self.bucket}", *parts])

    def filesystem(self):
        """An fsspec filesystem for test set-up, configured as the project configures it."""
        import fsspec

        from pipeline.shards.storage import options_for

        return fsspec.filesystem(self.scheme, skip_instance_cache=True, **options_for(f"{self.scheme}://", None))


@pytest.fixture(params=["s3", "gs"])
def object_store(request) -> ObjectStore:
    """The same test against S3 (moto server) and GCS (fake-gcs-server), credentials from the environment."""
    if request.param == "s3":
        env = request.getfixturevalue("s3_env")
        return ObjectStore("s3", env["BUCKET"], env, env["AWS_ENDPOINT_URL"])
    env = request.getfixturevalue("gcs_env")
    return ObjectStore("gs", env["BUCKET"], env, env["STORAGE_EMULATOR_HOST"])


@pytest.fixture(scope="session")
def meta_dir(sample_data_dir, tiny_model_dir, tmp_path_factory):
    """The three sample tasks extracted under one meta dir, small shards so there are several per stream."""
    from helpers import extract

    def build(root: Path) -> None:
        for task in ("edit_single", "compose_multi", "text_to_image"):
            extract(sample_data_dir / task / "data.jsonl", root / task, tiny_model_dir, "--max_samples_per_shard", "3")

    return built_once(tmp_path_factory, "meta", build)


@pytest.fixture(scope="session")
def edit_meta(sample_data_dir, tiny_model_dir, tmp_path_factory):
    """A handful of single-source edits to overfit (read-only to the tests: training writes nothing beside shards)."""
    from helpers import extract

    def build(root: Path) -> None:
        rows = (sample_data_dir / "edit_single" / "data.jsonl").read_text().splitlines()[:4]
        jsonl = sample_data_dir / "edit_single" / "four.jsonl"  # beside data.jsonl: its image paths are relative
        jsonl.write_text("\n".join(rows) + "\n")
        extract(jsonl, root / "four", tiny_model_dir)

    return built_once(tmp_path_factory, "overfit", build)


FSDP_REFERENCE = ["--parallelism", "fsdp", "--max_train_steps", "6", "--checkpointing_steps", "3", "--learning_rate",
                  "5e-3"]  # fmt: skip


@pytest.fixture(scope="session")
def fsdp_reference(tiny_model_dir, edit_meta, sample_data_dir, tmp_path_factory) -> Path:
    """One FSDP2 run on 2 processes (``FSDP_REFERENCE`` over ``edit_meta``, 6 steps, checkpoints at 3 and 6), with
    validation rendered at both and its data trace in ``fsdp-reference.jsonl`` beside the folder: what the FSDP
    resume, the two-node run and CPU offload must each reproduce bit for bit. Built once per session (a 2-process
    run costs ~30 CPU-seconds)."""
    import json

    from helpers import train

    def build(out: Path) -> None:
        validation = out.parent / "fsdp-reference-validation.jsonl"  # rendered by both ranks (the sharded forward)
        source = sample_data_dir / "edit_single" / "images" / "0000_src.jpg"
        validation.write_text(json.dumps({"source_image": str(source), "instruction": "Make it blue."}) + "\n")
        rendering = ["--validation_jsonl", str(validation), "--validation_steps", "3",
                     "--validation_inference_steps", "1"]  # fmt: skip
        train(tiny_model_dir, edit_meta, out, *FSDP_REFERENCE, "--data_trace", str(out.parent / "fsdp-reference.jsonl"),
              *rendering, nproc=2)  # fmt: skip

    return built_once(tmp_path_factory, "fsdp-reference", build)
