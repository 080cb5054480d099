"""Where training samples come from: tasks, their shard lists per source count, and shard readers.

Two ways to read a shard, chosen per shard:

* **indexed** (local files, s3://, gs://, http(s) with a ``.index.json`` beside
  the shard): byte-range reads of just the members a sample needs.  webdataset
  reads tars as a stream and cannot fetch one member by offset, so this reader
  is ours; it is what makes resume a seek and lets a batch fetch only the
  embedding variant it uses.
* **streamed** (``pipe:`` URLs, or shards without an index): webdataset opens the
  URL, expands the tar and groups members into samples; we only skip the
  samples another (rank, worker) owns.

Members ending in ``.pyd``/``.pickle``/``.pth``/``.pt`` are never decoded.
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import braceexpand
import fsspec

from pipeline.shardformat import MANIFEST, check_npy, index_name, is_forbidden_member
from pipeline.storage import Store, join, options_for, protocol_of

log = logging.getLogger(__name__)

SEEKABLE_PROTOCOLS = {"file", "local", "s3", "s3a", "gs", "gcs", "http", "https", "memory"}
READ_RETRIES = 4


@dataclass
class Shard:
    url: str  # absolute URL or path
    num_sources: int
    samples: int | None = None  # known from the manifest
    index_url: str | None = None


@dataclass
class Task:
    name: str
    shards: dict[int, list[Shard]] = field(default_factory=dict)  # N -> shards, sorted by URL
    null_embedding_url: str | None = None
    manifest: dict[str, Any] | None = None

    def counts(self) -> dict[int, int]:
        return {n: len(s) for n, s in self.shards.items() if s}


class DataConfigError(ValueError):
    """A problem with the data flags a user can fix (unknown task, nothing to train on ...)."""


# ---------------------------------------------------------------------------------------------
# discovery


def task_from_manifest(name: str, task_url: str, storage_options: dict | None) -> Task:
    store = Store(task_url, storage_options)
    manifest = store.read_json(MANIFEST)
    task = Task(name=manifest.get("task", name), manifest=manifest)
    task.name = name
    for entry in manifest["shards"]:
        shard = Shard(
            url=join(task_url, entry["url"]),
            num_sources=int(entry["num_sources"]),
            samples=int(entry["samples"]),
            index_url=join(task_url, entry["index"]) if entry.get("index") else None,
        )
        task.shards.setdefault(shard.num_sources, []).append(shard)
    for shards in task.shards.values():
        shards.sort(key=lambda s: s.url)
    if manifest.get("null_embedding"):
        task.null_embedding_url = join(task_url, manifest["null_embedding"])
    return task


def discover_tasks(meta_dir: str, storage_options: dict | None) -> dict[str, Task]:
    """Task directories with a manifest directly under ``meta_dir`` (one listing, at start-up)."""
    store = Store(meta_dir, storage_options)
    tasks = {}
    for name in store.listdir(""):
        if store.exists(f"{name}/{MANIFEST}"):
            tasks[name] = task_from_manifest(name, join(meta_dir, name), storage_options)
    if not tasks:
        raise DataConfigError(f"no task directory with a {MANIFEST} under {meta_dir}")
    return tasks


_SRC_DIR = re.compile(r"(?:^|/)src(\d)/")


def task_from_patterns(name: str, patterns: list[str], storage_options: dict | None) -> Task:
    """A task from explicit shard URL patterns (brace expansion); N from the ``src{N}/`` folder."""
    task = Task(name=name)
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            match = _SRC_DIR.search(url.split("::")[0])
            if not match:
                raise DataConfigError(f"{url}: cannot tell the number of source images (expected a src{{N}}/ folder)")
            n = int(match.group(1))
            index, count = None, None
            seekable = protocol_of(url) in SEEKABLE_PROTOCOLS and url.endswith(".tar")
            if seekable and _exists(index_name(url), storage_options):
                index = index_name(url)
                with fsspec.open(index, "rb", **options_for(index, storage_options)) as handle:
                    count = len(json.loads(handle.read())["samples"])
            task.shards.setdefault(n, []).append(Shard(url=url, num_sources=n, samples=count, index_url=index))
    for shards in task.shards.values():
        shards.sort(key=lambda s: s.url)
    # a manifest next to the src{N}/ folders gives the null embedding
    first = next((s.url for ss in task.shards.values() for s in ss), None)
    if first and protocol_of(first) in SEEKABLE_PROTOCOLS:
        root = first[: _SRC_DIR.search(first).start()]
        null = join(root, "null_embedding.npy") if root else "null_embedding.npy"
        if _exists(null, storage_options):
            task.null_embedding_url = null
    return task


def _exists(url: str, storage_options: dict | None) -> bool:
    try:
        fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
        return fs.exists(path)
    except Exception:  # unreachable: treated as absent (the shard is then streamed)
        return False


def parse_shard_flags(values: list[str]) -> dict[str, list[str]]:
    """``--train_shards task=PATTERN`` (repeatable) → task → patterns."""
    out: dict[str, list[str]] = {}
    for value in values:
        name, sep, pattern = value.partition("=")
        if not sep or not name.strip() or not pattern.strip():
            raise DataConfigError(f"--train_shards expects TASK=URL_PATTERN, got {value!r}")
        out.setdefault(name.strip(), []).append(pattern.strip())
    return out


def stable_id(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# reading


def _with_retries(what: str, fn, retries: int = READ_RETRIES):
    """Retry transient read errors (network resets, throttling) with backoff; missing files fail at once."""
    for attempt in range(retries):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as exc:
            if attempt == retries - 1:
                raise
            delay = 0.2 * 2**attempt
            log.warning(
                "transient error reading %s (%s: %s); retry %d in %.1fs",
                what,
                type(exc).__name__,
                exc,
                attempt + 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class RangeReader:
    """Byte ranges and whole objects from any fsspec URL, with retries; counts bytes read."""

    def __init__(self, storage_options: dict | None):
        self.storage_options = storage_options
        self._fs: dict[str, Any] = {}
        self.bytes_read = 0

    def _resolve(self, url: str):
        protocol = protocol_of(url)
        if protocol not in self._fs:
            self._fs[protocol] = fsspec.core.url_to_fs(url, **options_for(url, self.storage_options))[0]
        fs = self._fs[protocol]
        return fs, fs._strip_protocol(url)

    def read(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        fs, path = self._resolve(url)
        data = _with_retries(url, lambda: fs.cat_file(path, start=start, end=end))
        if start is not None and end is not None and len(data) != end - start:
            raise OSError(f"{url}: short read at [{start}, {end}) — truncated shard?")
        self.bytes_read += len(data)
        return data


class IndexCache:
    """Per-shard ``.index.json`` documents, least recently used first out (memory stays bounded)."""

    def __init__(self, reader: RangeReader, capacity: int = 64):
        self.reader, self.capacity = reader, capacity
        self._items: OrderedDict[str, list[dict]] = OrderedDict()

    def get(self, url: str) -> list[dict]:
        if url in self._items:
            self._items.move_to_end(url)
            return self._items[url]
        samples = json.loads(self.reader.read(url))["samples"]
        self._items[url] = samples
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return samples


@dataclass
class RawSample:
    """One sample as read: metadata, image bytes, and embeddings (bytes, or offsets to fetch later)."""

    key: str
    meta: dict[str, Any]
    images: dict[str, bytes]  # role -> encoded bytes
    shard_url: str
    embeddings: dict[str, bytes] = field(default_factory=dict)  # variant -> npy bytes (streamed reads)
    embedding_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # variant -> [start, end)


def split_members(key: str, members: dict[str, bytes], shard_url: str) -> RawSample:
    """Turn webdataset-style members into a RawSample; forbidden members are dropped undecoded."""
    meta = json.loads(members["json"].decode("utf-8"))
    images, embeddings = {}, {}
    for ext, data in members.items():
        if ext == "json" or is_forbidden_member(ext):
            continue
        if ext.startswith("emb_") and ext.endswith(".npy"):
            embeddings[ext[4:-4]] = data
        else:
            images[ext.split(".", 1)[0]] = data
    return RawSample(key=key, meta=meta, images=images, shard_url=shard_url, embeddings=embeddings)


def expected_members(meta: dict[str, Any]) -> set[str]:
    """Member extensions a complete sample has, according to its own json."""
    images = [meta["target"]["member"], *(s["member"] for s in meta.get("sources", []))]
    return {"json", *images, *(f"emb_{v}.npy" for v in meta.get("variants", {}))}


def read_indexed_sample(reader: RangeReader, shard_url: str, entry: dict) -> RawSample:
    """Read json + images of one sample in one range request; embeddings stay as offsets."""
    members = entry["members"]
    wanted = [ext for ext in members if not ext.startswith("emb_") and not is_forbidden_member(ext)]
    start = min(members[ext][0] for ext in wanted)
    end = max(members[ext][0] + members[ext][1] for ext in wanted)
    blob = reader.read(shard_url, start, end)
    chosen = {ext: blob[members[ext][0] - start : members[ext][0] - start + members[ext][1]] for ext in wanted}
    sample = split_members(entry["key"], chosen, shard_url)
    for ext, (offset, size) in members.items():
        if ext.startswith("emb_") and ext.endswith(".npy"):
            sample.embedding_ranges[ext[4:-4]] = (offset, offset + size)
    return sample


def stream_shard(url: str, storage_options: dict | None):
    """Samples of one shard in file order, read by webdataset (URL opening, tar expansion, grouping)."""
    import webdataset as wds

    register_fsspec_openers(storage_options)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([url]),
        wds.tarfile_to_samples(handler=_warn_and_stop, select_files=lambda name: not is_forbidden_member(name)),
    )
    for sample in pipeline:
        key = sample.pop("__key__")
        sample.pop("__url__", None)
        sample.pop("__local_path__", None)
        try:
            if "json" not in sample:
                raise ValueError("no json member")
            raw = split_members(key, sample, url)
            missing = expected_members(raw.meta) - set(sample)
            if missing:
                raise ValueError(f"members missing (truncated shard?): {sorted(missing)}")
            for data in raw.embeddings.values():
                check_npy(data)
        except Exception as exc:  # the caller counts and skips it
            yield CorruptSample(f"{url}: sample {key}: {type(exc).__name__}: {exc}")
            continue
        yield raw


@dataclass
class CorruptSample:
    """Placeholder yielded by :func:`stream_shard` for a sample that cannot be used."""

    reason: str


def _warn_and_stop(exc: Exception) -> bool:
    log.warning("shard read error, rest of the shard skipped: %s", exc)
    return False


_REGISTERED: set[str] = set()


def register_fsspec_openers(storage_options: dict | None) -> None:
    """Let webdataset's gopen open s3:// and gs:// through fsspec (it has no opener for s3 of its own)."""
    from webdataset.gopen import gopen_schemes

    for scheme in ("s3", "gs", "gcs"):
        if scheme in _REGISTERED:
            continue

        def opener(url, mode="rb", bufsize=8192, **kw):
            return fsspec.open(url, mode, **options_for(url, storage_options)).open()

        gopen_schemes[scheme] = opener
        _REGISTERED.add(scheme)
