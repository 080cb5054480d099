"""Faults and hostile input in extraction and the shard tools: no hang, no poison line (issue 12)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from helpers import extract, read_samples

from pipeline.shards.commits import ProgressLog
from pipeline.shards.storage import Store
from pipeline.shards.writer import Failure, PreparedSample, ShardSink


class ForbiddenStore(MemoryFileSystem):
    """An object store whose uploads are refused (expired credentials, a full disk, a permission error)."""

    protocol = ("forbidden",)

    def put_file(self, lpath, rpath, **kwargs):
        raise PermissionError(f"403 Forbidden: credentials expired uploading {rpath}")

    def pipe_file(self, path, value, **kwargs):
        raise PermissionError(f"403 Forbidden: credentials expired writing {path}")


@pytest.fixture
def forbidden_store(monkeypatch):
    import fsspec

    fsspec.register_implementation("forbidden", ForbiddenStore, clobber=True)
    yield "forbidden://bucket/task"
    fsspec.register_implementation("forbidden", "fsspec.implementations.memory.MemoryFileSystem", clobber=True)


def _sample(line: int) -> PreparedSample:
    meta = {"key": f"k{line}", "line": line, "num_sources": 0, "variants": {}}
    return PreparedSample(f"k{line}", line, 0, meta, {"target": ("png", b"\x89PNG fake")})


def _close_within(sink: ShardSink, seconds: float) -> BaseException | None:
    """Close the sink in a thread; fail the test if it does not return (the hang this guards against)."""
    outcome: list[BaseException | None] = []

    def close():
        try:
            sink.close()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            outcome.append(exc)

    thread = threading.Thread(target=close, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "ShardSink.close() hung after a writer error"
    return outcome[0]


def test_an_upload_error_in_the_final_flush_surfaces_instead_of_hanging(forbidden_store):
    """The last shard is published only at close(); its upload fails: close() must raise, not wait forever."""
    store = Store(forbidden_store)
    sink = ShardSink(store, ProgressLog(store, 0, []), 0, max_samples_per_shard=1000, max_shard_bytes=1 << 30)
    sink.add_sample(_sample(0), {"en": torch.zeros(3, 8)})
    sink.add_failure(Failure("in.jsonl", 1, "missing_image", "gone"))
    error = _close_within(sink, 30)
    assert isinstance(error, RuntimeError) and "credentials expired" in str(error)


@pytest.mark.slow
def test_poison_lines_do_not_stop_extraction(sample_data_dir, tiny_model_dir, tmp_path):
    """Deep nesting, lone surrogates (text and image path) and an invalid UTF-8 byte: recorded, the run goes on."""
    good = [json.loads(x) for x in (sample_data_dir / "edit_single" / "data.jsonl").read_text().splitlines()[:3]]
    for row in good:
        row["source_image"] = str(sample_data_dir / "edit_single" / row["source_image"])
        row["target_image"] = str(sample_data_dir / "edit_single" / row["target_image"])

    def escaped(row: dict, field: str, escape: str) -> bytes:  # a JSON escape json.dumps would never write
        return json.dumps({**row, field: row.get(field, "") + "@@"}).replace("@@", escape).encode()

    lines = [
        json.dumps(good[0]).encode(),
        b"[" * 100_000 + b"]" * 100_000,
        escaped(good[1], "instruction", "\\ud800"),
        escaped(good[1], "target_image", "\\udfff"),
        json.dumps({**good[1], "instruction": "caf"}).encode().replace(b'"caf"', b'"caf\xe9"'),
        json.dumps(good[2]).encode(),
    ]
    jsonl = tmp_path / "poison.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "task"
    result = extract(jsonl, out, tiny_model_dir, "--max_failure_ratio", "0.9", check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    failures = {f["line"]: f for f in map(json.loads, (out / "_failures" / "rank-0.jsonl").read_text().splitlines())}
    assert sorted(failures) == [1, 2, 3, 4]
    assert failures[2]["field"] == "instruction" and failures[3]["field"] == "target_image"
    assert "invalid UTF-8" in failures[4]["reason"] and failures[4]["file"] == str(jsonl)
    assert {json.loads(s["json"])["line"] for s in read_samples(str(out)).values()} == {0, 5}


def test_an_over_long_prompt_and_an_over_large_row_go_to_the_failures_file(sample_data_dir, tiny_model_dir, tmp_path):
    """A ~25 kB instruction (thousands of tokens, over --max_sequence_length) used to be extracted and then stop
    every training run that drew it; a 3 MB row was read whole and stored in the sample's json."""
    good = [json.loads(x) for x in (sample_data_dir / "edit_single" / "data.jsonl").read_text().splitlines()[:3]]
    for row in good:
        row["source_image"] = str(sample_data_dir / "edit_single" / row["source_image"])
        row["target_image"] = str(sample_data_dir / "edit_single" / row["target_image"])
    lines = [
        {**good[0], "note": "n" * 10_000},  # a field the format does not use, over 4 KiB: not stored
        {**good[1], "instruction": "make it blue, " * 1800},  # ~25 kB
        {**good[2], "blob": "x" * 3_000_000},
    ]
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in lines))
    out = tmp_path / "task"
    result = extract(jsonl, out, tiny_model_dir, "--max_failure_ratio", "0.9", "--disable_inverse", check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    failures = {f["line"]: f for f in map(json.loads, (out / "_failures" / "rank-0.jsonl").read_text().splitlines())}
    assert failures[1]["kind"] == "prompt_too_long" and "--max_sequence_length 1024" in failures[1]["reason"]
    assert failures[2]["kind"] == "row_too_large" and failures[2]["text"] == ""
    (sample,) = read_samples(str(out)).values()
    meta = json.loads(sample["json"])
    assert meta["line"] == 0 and "note" not in meta["extra"] and meta["extra"]["_dropped"] == ["note"]
    assert len(sample["json"]) < 4096


def test_flat_storage_options_go_to_the_output_store_not_to_http_images(sample_data_dir):
    from range_server import RangeServer

    from pipeline.common import images as imaging
    from pipeline.shards.storage import options_for, parse_storage_options

    flat = '{"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}'
    options = parse_storage_options(flat, "s3://bucket/shards/edit_a")
    assert options_for("s3://bucket/x", options) == json.loads(flat)
    assert options_for("https://cdn.example/x.png", options) == {}
    image = next((sample_data_dir / "edit_single" / "images").glob("0000_src.*"))
    with RangeServer(sample_data_dir) as server:
        loaded = imaging.load(f"{server.url}/edit_single/images/{image.name}", options)
    assert loaded.size[0] > 0
    assert parse_storage_options(flat, "/local/out") == json.loads(flat)  # no remote target: every remote protocol
    per_protocol = '{"s3": {"endpoint_url": "http://127.0.0.1:9"}}'
    assert parse_storage_options(per_protocol, "gs://b/t") == json.loads(per_protocol)


@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_removed_and_ignored(tmp_path, meta_dir):
    import hashlib
    import os
    import shutil
    import subprocess
    import sys

    from pipeline.shards.commits import remove_orphans
    from shards_tools.summary import task_stats

    task = tmp_path / "task"
    shutil.copytree(meta_dir / "edit_single", task)
    (task / "_failures").mkdir(exist_ok=True)
    (task / "_failures" / "rank-0.jsonl.tmp-1f2e").write_text('{"line": 1}\n')
    (task / "_progress" / "rank-00000" / "000099.json.tmp-77aa").write_text("{")
    assert task_stats(str(task), None)[0][0]["failures_recorded"] == 0  # a temporary file is not a failure
    removed = remove_orphans(Store(str(task)), [], lambda rank: rank == 0)
    assert "_failures/rank-0.jsonl.tmp-1f2e" in removed and "_progress/rank-00000/000099.json.tmp-77aa" in removed

    spool_root = tmp_path / "spool"
    spool_root.mkdir()
    store = Store(str(tmp_path / "out"))
    prefix = f"extract-{hashlib.sha256(store.root.encode()).hexdigest()[:12]}-r0-p"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (spool_root / f"{prefix}{dead.stdout.strip()}-x1").mkdir()
    (spool_root / f"{prefix}{dead.stdout.strip()}-x1" / "src1_00000-000003.tar").write_bytes(b"0" * 1000)
    (spool_root / f"{prefix}{os.getpid()}-live").mkdir()  # a run still alive keeps its folder
    sink = ShardSink(store, ProgressLog(store, 0, []), 0, 10, 1 << 20, tmp_dir=str(spool_root))
    sink.close()
    assert sorted(p.name for p in spool_root.iterdir()) == [f"{prefix}{os.getpid()}-live"]


def test_fetches_are_bounded_in_bytes_and_time(tmp_path, monkeypatch):
    import io
    import socket
    import time

    from PIL import Image
    from range_server import RangeServer

    from pipeline.common import images as imaging

    with pytest.raises(imaging.ImageLoadError, match="image_too_large.*more than the limit of 1048576 bytes"):
        imaging.load("/dev/zero", max_bytes=1 << 20)  # never ends: refused after the limit, not read whole
    (tmp_path / "big.bin").write_bytes(b"\0" * (3 << 20))
    with RangeServer(tmp_path) as server:  # a known size is refused before reading
        with pytest.raises(imaging.ImageLoadError, match=r"image_too_large.*3145728 bytes > limit 1048576"):
            imaging.load(f"{server.url}/big.bin", max_bytes=1 << 20)
        assert sum(1 for path, _ in server.requests if path == "/big.bin") <= 2  # a HEAD or size probe, no body read

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        with pytest.raises(imaging.ImageLoadError, match="fetch_error"):
            imaging.load(f"http://127.0.0.1:{silent.getsockname()[1]}/a.png", timeout=1.0)
        assert time.monotonic() - started < 15

    picture = io.BytesIO()
    Image.new("RGB", (50, 50), "red").save(picture, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's limit below the one asked for
    assert imaging.decode("x.png", picture.getvalue(), max_pixels=10_000).size == (50, 50)
    with pytest.raises(imaging.ImageLoadError, match="image_too_large"):
        imaging.decode("x.png", picture.getvalue(), max_pixels=2_000)


@pytest.mark.slow
def test_a_server_that_was_down_is_retried_on_rerun(sample_data_dir, tiny_model_dir, tmp_path):
    import shutil
    import socket
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    images = tmp_path / "www"
    shutil.copytree(sample_data_dir / "edit_single" / "images", images)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rows = [json.loads(x) for x in (sample_data_dir / "edit_single" / "data.jsonl").read_text().splitlines()[:3]]
    for row in rows:
        row["source_image"] = f"http://127.0.0.1:{port}/{row['source_image'].rsplit('/', 1)[-1]}"
        row["target_image"] = str(sample_data_dir / "edit_single" / row["target_image"])
    jsonl = tmp_path / "remote.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "task"
    down = extract(jsonl, out, tiny_model_dir, "--fetch_timeout", "5", check=False)
    assert down.returncode == 1 and "fetch_error" in (out / "_failures" / "rank-0.jsonl").read_text()

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(images), **kwargs)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = extract(jsonl, out, tiny_model_dir, check=False)
    finally:
        server.shutdown()
    assert up.returncode == 0, up.stderr[-2000:]
    assert "3 line(s) to process" in up.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 3 and manifest["failures"] == 0
    assert not (out / "_failures" / "rank-0.jsonl").exists()


@pytest.mark.slow
def test_a_rerun_from_other_input_or_flags_is_refused(sample_data_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "task"
    first = sample_data_dir / "text_to_image" / "data.jsonl"
    extract(first, out, tiny_model_dir, "--skip_embeddings")
    other = extract(
        sample_data_dir / "compose_multi" / "data.jsonl", out, tiny_model_dir, "--skip_embeddings", check=False
    )
    assert other.returncode == 2
    assert "input:" in other.stderr and "input_sha256_first_64MiB" in other.stderr and "To start fresh" in other.stderr
    styled = extract(first, out, tiny_model_dir, "--skip_embeddings", "--prompt_style", "firered", check=False)
    assert styled.returncode == 2 and "prompt_style: 'diffusers' then, 'firered' now" in styled.stderr
    # (the same command resumes: the SIGKILL tests rerun with the first run's input and flags)


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused(sample_data_dir, tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys
    import time

    from helpers import REPO, combined_jsonl, read_manifest

    rows = combined_jsonl(sample_data_dir, tmp_path / "mixed.jsonl").read_text().splitlines()
    jsonl = tmp_path / "twice.jsonl"  # long enough that the first run outlives the second's start-up
    jsonl.write_text("\n".join(rows * 2) + "\n")
    out = tmp_path / "task"
    args = [str(jsonl), "--output_dir", str(out), "--model_path", str(tiny_model_dir), "--num_workers", "0"]
    args += ["--batch_size", "1", "--max_samples_per_shard", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "pipeline.extract", *args], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "_progress" / "lease-rank-00000.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(
        [sys.executable, "-m", "pipeline.extract", *args], env=env, capture_output=True, text=True, timeout=300
    )
    # refused means it found the first run's lease held by a live process (a finished run releases it)
    assert second.returncode == 2 and "another run" in second.stderr and "is writing rank 0" in second.stderr
    assert first.wait(timeout=600) == 0, first.stderr.read().decode()[-2000:]
    manifest = read_manifest(str(out))
    assert manifest["samples"] == 72 and not (out / "_progress" / "lease-rank-00000.json").exists()
    assert {p.name for p in out.rglob("*.tar")} == {s["url"].rsplit("/", 1)[1] for s in manifest["shards"]}


@pytest.mark.slow
def test_a_stopped_extraction_leaves_no_lease_and_no_spool(sample_data_dir, tiny_model_dir, tmp_path):
    """SIGTERM (torchrun stopping the other ranks when one fails, a scheduler's stop) runs the cleanup: the lease
    is released and the spooled partial shard removed; a killed run's spool of another task goes at the next start."""
    import os
    import subprocess
    import sys
    import time

    from helpers import REPO, combined_jsonl

    spool_root = tmp_path / "tmp"
    spool_root.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = spool_root / f"extract-{'0' * 12}-r0-p{dead.pid}-abc"  # another task's, its run killed
    stale.mkdir()
    (stale / "src1_00000-000000.tar").write_bytes(b"partial")
    rows = combined_jsonl(sample_data_dir, tmp_path / "mixed.jsonl").read_text().splitlines()
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text("\n".join(rows * 3) + "\n")
    out = tmp_path / "task"
    args = [str(jsonl), "--output_dir", str(out), "--model_path", str(tiny_model_dir), "--num_workers", "0"]
    args += ["--batch_size", "1", "--max_samples_per_shard", "1000"]  # one shard stays open: a partial tar
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(spool_root)}
    run = subprocess.Popen([sys.executable, "-m", "pipeline.extract", *args], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
        p.parent != stale and p.stat().st_size for p in spool_root.rglob("*.tar")
    ):
        time.sleep(0.05)
    assert not stale.exists(), "a dead run's spool is removed whatever task it was for"
    assert list(spool_root.glob("extract-*")) and (out / "_progress" / "lease-rank-00000.json").exists()
    run.terminate()
    assert run.wait(timeout=120) != 0
    assert not list(spool_root.glob("extract-*")), "the partial shard's spool is removed"
    assert not (out / "_progress" / "lease-rank-00000.json").exists(), "the lease is released"


def test_a_hung_cli_and_its_dataloader_workers_print_their_stacks_before_the_test_kills_them():
    """A hang in CI must say where it waited: our CLIs dump every thread's stack on SIGUSR1 (forked DataLoader
    workers inherit it), and the test helper sends it to the whole process tree before killing it."""
    from helpers import REPO, run_bounded

    code = (
        "from pipeline.common.logs import setup_logging\n"
        "import os, time\n"
        "setup_logging()\n"
        "def parent_waits_here():\n"
        "    time.sleep(100)\n"
        "def worker_waits_here(n):\n"
        "    time.sleep(100)\n"
        "for n in range(4):\n"
        "    if os.fork() == 0:\n"
        "        worker_waits_here(n)\n"
        "parent_waits_here()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    with pytest.raises(AssertionError, match="ran past 2 s") as failure:
        run_bounded([sys.executable, "-c", code], env, 2)
    # Five processes share one stderr: each one's stack arrives whole (lines not interleaved with another's),
    # so each frame's line reads intact, once per process.
    lines = str(failure.value).splitlines()
    assert sum(line.strip().startswith('File "<string>", line 5 in parent_waits_here') for line in lines) == 1
    assert sum(line.strip().startswith('File "<string>", line 7 in worker_waits_here') for line in lines) == 4
    assert time.monotonic() - started < 60  # killed, not left to sleep its 100 s (60: a loaded 2-core machine)
