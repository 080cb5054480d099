"""Reading what extraction wrote, for the operator tools: tasks, shard lists, members, samples."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.shardformat import MANIFEST
from pipeline.storage import Store, join, options_for


@dataclass
class TaskView:
    """One task directory: its URL and manifest (None when missing or unreadable)."""

    name: str
    url: str
    manifest: dict[str, Any] | None
    error: str | None = None

    def shard_urls(self) -> list[str]:
        return [join(self.url, s["url"]) for s in (self.manifest or {}).get("shards", [])]


def open_task(url: str, storage_options: dict | None) -> TaskView:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    try:
        return TaskView(name, url, Store(url, storage_options).read_json(MANIFEST))
    except FileNotFoundError:
        return TaskView(name, url, None, f"{join(url, MANIFEST)}: missing")
    except (ValueError, OSError) as exc:
        return TaskView(name, url, None, f"{join(url, MANIFEST)}: unreadable ({exc})")


def open_tasks(url: str, storage_options: dict | None) -> list[TaskView]:
    """A task directory, or every task directory directly under a meta directory."""
    store = Store(url, storage_options)
    if store.exists(MANIFEST):
        return [open_task(url, storage_options)]
    tasks = [
        open_task(join(url, name), storage_options) for name in store.listdir("") if store.exists(f"{name}/{MANIFEST}")
    ]
    if not tasks:
        raise FileNotFoundError(f"{url}: no {MANIFEST} here or in any subfolder")
    return tasks


def shard_list(url: str, storage_options: dict | None) -> list[str]:
    """A single ``.tar`` URL, or every shard a task (or meta) directory's manifests list."""
    if url.endswith(".tar"):
        return [url]
    return [s for task in open_tasks(url, storage_options) for s in task.shard_urls()]


def iter_members(url: str, storage_options: dict | None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular member, in file order; nothing is decoded."""
    from webdataset.tariterators import tar_file_iterator

    with fsspec.open(url, "rb", **options_for(url, storage_options)) as handle:
        for item in tar_file_iterator(handle, skip_meta=None):
            yield item["fname"], item["data"]


def split_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` → (``dir/key``, ``ext.more``): webdataset's key convention."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext


def iter_samples(url: str, storage_options: dict | None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample: consecutive members sharing a key."""
    key, members = None, {}
    for name, data in iter_members(url, storage_options):
        k, ext = split_name(name)
        if k != key and members:
            yield key, members
            members = {}
        key = k
        members[ext] = data
    if members:
        yield key, members


def sample_meta(members: dict[str, bytes]) -> dict[str, Any]:
    return json.loads(members["json"].decode("utf-8"))
