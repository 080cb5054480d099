"""Checkpoint folders: their names, their markers, which are complete, and moving or pruning them.

A checkpoint is ``checkpoint-{step}/`` with ``checkpoint.json`` (its marker: the
step, the run's id and mode, every file's size and sha256). A folder without its
marker is not a checkpoint: a save publishes the folder with its marker in one
rename, and pruning removes the marker first.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.files import read_json_object

log = logging.getLogger(__name__)

MARKER = "checkpoint.json"
ABANDONED = "abandoned-"
DAMAGED = "damaged-"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def staging_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f".checkpoint-{step}.incomplete"


def final_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(output_dir: str | os.PathLike, value: str | None) -> Path | None:
    """``latest`` → newest complete checkpoint (None if there is none); a path, or a checkpoint's name inside
    ``output_dir``, must be complete."""
    if not value:
        return None
    if value == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            log.info("--resume_from_checkpoint latest: no complete checkpoint in %s; starting at step 0", output_dir)
        return found[-1][1] if found else None
    path = Path(value)
    if not (path / MARKER).is_file() and (Path(output_dir) / path.name / MARKER).is_file():
        path = Path(output_dir) / path.name  # a name inside output_dir ("checkpoint-500"), as the original accepts
    if not (path / MARKER).is_file():
        raise UserError(
            f"--resume_from_checkpoint {value} is not a complete checkpoint (no {MARKER}), neither as a path nor "
            f"inside {output_dir}"
        )
    return path


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's marker, validated: an object with an integer step and a record per file (ValueError)."""
    marker = read_json_object(Path(path) / MARKER)
    if not isinstance(marker.get("step"), int) or isinstance(marker.get("step"), bool):
        raise ValueError(f"its step is {marker.get('step')!r}, not an integer")
    files = marker.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise ValueError(f"its file records are a {type(files).__name__}, not an object")
        for name, record in files.items():
            if not (
                isinstance(record, dict)
                and isinstance(record.get("size"), int)
                and isinstance(record.get("sha256"), str)
            ):
                raise ValueError(f"the record of {name} is {record!r}, not {{size, sha256}}")
    return marker


def marker_or_none(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return read_marker(path)
    except (OSError, ValueError):
        return None


def step_of(folder: Path) -> int:
    """The step in a ``checkpoint-N`` folder's name (a damaged marker cannot say it)."""
    match = _NAME.match(folder.name)
    return int(match.group(1)) if match else -1


def prune(
    output_dir: str | os.PathLike,
    total_limit: int | None,
    owns: Callable[[dict[str, Any]], bool] = lambda marker: True,
) -> None:
    """Keep the newest ``total_limit`` checkpoints of the run that ``owns`` their marker; never touch another's.

    The run's checkpoints set aside when it resumed from an earlier one
    (``abandoned-*``) count as older than every live one, so they go first. The
    marker goes first: a prune cut short leaves a folder ``latest`` ignores, never
    a half-deleted one it would take as complete.
    """
    if not total_limit or total_limit <= 0:
        return
    root = Path(output_dir)
    abandoned = sorted(p for p in root.glob(f"{ABANDONED}*") if p.is_dir())
    mine = [p for p in abandoned if (m := marker_or_none(p)) is not None and owns(m)]
    mine += [p for _, p in complete_checkpoints(root) if (m := marker_or_none(p)) is not None and owns(m)]
    for path in mine[: max(0, len(mine) - total_limit)]:
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed old checkpoint %s", path)


def clean_stale(output_dir: str | os.PathLike) -> list[Path]:
    """Remove what killed saves and prunes left (rank 0, before any save): staging folders, and ``checkpoint-N``
    folders without their marker (a folder is published with its marker, and pruning removes the marker first,
    so only a prune cut short leaves one: nothing would ever count or remove it)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    stale = sorted(root.glob(".checkpoint-*.incomplete"))
    unmarked = sorted(p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir() and not (p / MARKER).exists())
    for path in stale + unmarked:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed the unfinished checkpoint %s", path)
    return stale + unmarked


def aside_path(parent: Path, prefix: str, name: str = "") -> Path:
    """A new name to move something aside to: ``{prefix}{stamp}[-n][-name]``, never one that exists (two moves
    in one second get distinct names)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = f"-{name}" if name else ""
    for n in range(1000):
        candidate = parent / f"{prefix}{stamp}{f'.{n}' if n else ''}{suffix}"
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"{parent}: no free name for {prefix}{stamp}{suffix}")


def set_aside_newer(output_dir: str | os.PathLike, step: int, damaged: dict[Path, str] | None = None) -> list[Path]:
    """Rename complete checkpoints newer than ``step`` out of the way: ``damaged-*`` for those found damaged (kept
    for inspection, never pruned), ``abandoned-*`` for intact ones a resume from an earlier step leaves behind.

    Otherwise ``latest`` would point back into the abandoned timeline and pruning
    would count its checkpoints as newer than the ones this run saves.
    """
    damaged = damaged or {}
    moved = []
    for found_step, path in complete_checkpoints(output_dir):
        if found_step <= step:
            continue
        why = damaged.get(path)
        target = aside_path(path.parent, DAMAGED if why else ABANDONED, path.name)
        os.replace(path, target)
        moved.append(target)
        if why:
            log.warning("%s is damaged (%s): moved to %s", path, why, target)
        else:
            log.warning("resuming at step %d: %s is of the abandoned later timeline, moved to %s", step, path, target)
    return moved
