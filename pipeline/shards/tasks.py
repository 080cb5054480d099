"""Task directories: which exist under a meta directory, their manifests, and their shards per source count.

Training (strict: a missing manifest is a configuration error) and the shard
tools (tolerant: a broken task is reported, the others still checked) find and
open tasks through the same functions here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import braceexpand
import fsspec

from pipeline.errors import DataError
from pipeline.shards.format import (
    DEFAULT_FAMILY,
    FORMAT_VERSION,
    KNOWN_FORMAT_VERSIONS,
    MANIFEST,
    NULL_EMBEDDING,
    SOURCE_COUNTS,
    index_name,
)
from pipeline.shards.storage import Store, join, options_for, protocol_of, uri_exists

# protocols on which a shard can be read by byte ranges (through its .index.json)
SEEKABLE_PROTOCOLS = {"file", "local", "s3", "s3a", "gs", "gcs", "http", "https", "memory"}


class DataConfigError(DataError):
    """A problem with the data a user pointed us at that they can fix (unknown task, nothing to train on ...)."""


@dataclass
class Shard:
    url: str  # absolute URL or path
    num_sources: int
    samples: int | None = None  # known from the manifest
    index_url: str | None = None


@dataclass
class Task:
    """A task: its shards by number of source images, its null embedding, its manifest when it has one."""

    name: str
    shards: dict[int, list[Shard]] = field(default_factory=dict)  # N -> shards, sorted by URL
    null_embedding_url: str | None = None
    manifest: dict[str, Any] | None = None
    url: str | None = None  # the task directory (None for a task given as shard patterns)
    error: str | None = None  # why the manifest could not be read (tolerant opening only)

    def counts(self) -> dict[int, int]:
        return {n: len(s) for n, s in self.shards.items() if s}

    @property
    def family(self) -> str:
        """The model family the task's embeddings are for (a manifest without one: Qwen-Image-Edit's, as v1)."""
        return (self.manifest or {}).get("family") or DEFAULT_FAMILY

    @property
    def hidden_size(self) -> int | None:
        """The width of the task's embeddings, as its manifest records it (None without a manifest)."""
        manifest = self.manifest or {}
        value = (manifest.get("model") or {}).get("hidden_size") or (manifest.get("embedding") or {}).get("hidden_size")
        return value if isinstance(value, int) else None

    def shard_urls(self) -> list[str]:
        """Every shard the manifest lists, in manifest order."""
        return [join(self.url, s["url"]) for s in (self.manifest or {}).get("shards", [])]


def task_dirs(url: str, storage_options: dict | None) -> list[str]:
    """``url`` itself when it holds a manifest, else its direct subfolders that do (one listing)."""
    store = Store(url, storage_options)
    if store.exists(MANIFEST):
        return [url]
    return [join(url, name) for name in store.listdir("") if store.exists(f"{name}/{MANIFEST}")]


def read_manifest(task_url: str, storage_options: dict | None) -> dict[str, Any]:
    """A task's manifest, checked enough to open the task; a problem names the file and what is wrong."""
    where = join(task_url, MANIFEST)
    try:
        manifest = Store(task_url, storage_options).read_json(MANIFEST)
    except FileNotFoundError:
        raise DataConfigError(f"{where}: missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataConfigError(f"{where}: not valid JSON, truncated or damaged? ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataConfigError(f"{where}: has no 'shards' list; not a manifest written by this project")
    version = manifest.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or version not in KNOWN_FORMAT_VERSIONS:
        raise DataConfigError(
            f"{where}: shard format version {version!r}, which this version does not read (it reads "
            f"{', '.join(map(str, KNOWN_FORMAT_VERSIONS))}); upgrade the tool"
        )
    if not isinstance(manifest.get("family", DEFAULT_FAMILY), str):
        raise DataConfigError(f"{where}: its 'family' is {manifest['family']!r}, not a model family's name")
    for i, entry in enumerate(manifest["shards"]):
        missing = [k for k in ("url", "num_sources", "samples") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise DataConfigError(f"{where}: shards[{i}] lacks {', '.join(missing)}")
        problem = _entry_problem(entry)
        if problem:
            raise DataConfigError(
                f"{where}: shards[{i}] ({entry.get('url')}) {problem}; check the task with "
                f"python -m shards_tools verify {task_url}"
            )
    return manifest


MAX_SHARD_SAMPLES = 1_000_000  # a shard of more would carry over 1.5 GB of tar headers alone
MIN_SAMPLE_BYTES = 3 * 512  # a sample is at least a json, an image and an embedding: three tar headers


def _entry_problem(entry: dict[str, Any]) -> str | None:
    """What is impossible in one manifest entry (checked before any allocation is sized from it), or None."""
    samples, size, n = entry.get("samples"), entry.get("bytes"), entry.get("num_sources")
    if not isinstance(entry.get("url"), str) or not entry["url"]:
        return f"has the url {entry.get('url')!r}"
    if not isinstance(n, int) or isinstance(n, bool) or n not in SOURCE_COUNTS:
        return f"has num_sources {n!r}, not one of {list(SOURCE_COUNTS)}"
    if not isinstance(samples, int) or isinstance(samples, bool) or not 0 <= samples <= MAX_SHARD_SAMPLES:
        return f"claims {samples!r} samples, not a count from 0 to {MAX_SHARD_SAMPLES:,}"
    if isinstance(size, int) and not isinstance(size, bool) and samples * MIN_SAMPLE_BYTES > size:
        return f"claims {samples} samples in {size} bytes (a sample takes at least {MIN_SAMPLE_BYTES})"
    return None


def task_from_manifest(name: str, task_url: str, manifest: dict[str, Any]) -> Task:
    task = Task(name=name, manifest=manifest, url=task_url)
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


def open_task(url: str, storage_options: dict | None) -> Task:
    """A task directory; an unreadable manifest gives a task with ``manifest=None`` and the reason in ``error``."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    try:
        manifest = read_manifest(url, storage_options)
    except DataConfigError as exc:
        return Task(name, url=url, error=str(exc))
    except OSError as exc:
        return Task(name, url=url, error=f"{join(url, MANIFEST)}: unreadable ({exc})")
    return task_from_manifest(name, url, manifest)


def open_tasks(url: str, storage_options: dict | None) -> list[Task]:
    """A task directory, or every task directory directly under a meta directory (tolerant)."""
    tasks = [open_task(u, storage_options) for u in task_dirs(url, storage_options)]
    if not tasks:
        raise DataConfigError(f"{url}: no {MANIFEST} here or in any subfolder")
    return tasks


def discover_tasks(meta_dir: str, storage_options: dict | None, wanted: set[str] | None = None) -> dict[str, Task]:
    """Task directories with a manifest directly under ``meta_dir`` (one listing, at start-up; strict).

    With ``wanted``, only those tasks' manifests are read (a broken manifest of a
    task not trained on does not stop training); a wanted task that is not there
    is an error naming the ones that are.
    """
    urls = {url.rsplit("/", 1)[-1]: url for url in task_dirs(meta_dir, storage_options) if url != meta_dir}
    if not urls:
        raise DataConfigError(f"no task directory with a {MANIFEST} under {meta_dir}")
    unknown = sorted(set(wanted or ()) - set(urls))
    if unknown:
        raise DataConfigError(f"--train_data_weights names unknown task(s) {unknown}; available tasks: {sorted(urls)}")
    names = sorted(urls) if wanted is None else sorted(wanted)
    return {name: task_from_manifest(name, urls[name], read_manifest(urls[name], storage_options)) for name in names}


def shard_list(url: str, storage_options: dict | None) -> list[str]:
    """A single ``.tar`` URL, or every shard a task (or meta) directory's manifests list."""
    if url.endswith(".tar"):
        return [url]
    return [s for task in open_tasks(url, storage_options) for s in task.shard_urls()]


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
            if seekable and uri_exists(index_name(url), storage_options):
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
        null = join(root, NULL_EMBEDDING) if root else NULL_EMBEDDING
        if uri_exists(null, storage_options):
            task.null_embedding_url = null
    return task
