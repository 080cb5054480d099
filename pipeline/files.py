"""Local files written so that a crash leaves the old one or the new one, never a torn one; JSON files.

Both halves write through here: shards and commit records (through
``pipeline.shards.storage``), checkpoints, run records and recipes.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """The one atomic write of a local file: a temporary beside it, fsynced, renamed over it, the folder fsynced."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def fsync_file(path: str) -> None:
    """Make a file's bytes durable before a name or a record says it is there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (a power loss otherwise may forget it after the commit record)."""
    try:
        fsync_file(path or ".")
    except OSError:  # some filesystems cannot fsync a directory
        pass


def write_json_file(path: str | os.PathLike, value: Any) -> None:
    """JSON written atomically."""
    atomic_write(path, json.dumps(value).encode("utf-8"))


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file that must hold an object (ValueError otherwise, as for text that is not JSON)."""
    value = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, found {type(value).__name__}")
    return value
