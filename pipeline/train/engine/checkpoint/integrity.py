"""A checkpoint's integrity: every file's size and sha256 recorded when it is saved, checked before a resume.

Each rank hashes the files it wrote (the rank in a file's name says whose it is)
and checks the same share on resume, so the work is spread over the ranks. A
resume takes the checkpoint :func:`choose_intact` gives: ``latest`` passes over
damaged checkpoints to the newest intact one; a named checkpoint that is damaged
stops with one line naming the file and the checkpoint to resume from instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.train.engine.checkpoint.folders import (
    MARKER,
    clean_stale,
    complete_checkpoints,
    marker_or_none,
    read_marker,
    resolve_resume,
    set_aside_newer,
    step_of,
)

log = logging.getLogger(__name__)

_RANK_IN_NAME = re.compile(r"rank(\d+)")
HASH_LIST = ".files-rank{rank}.json"  # one rank's hashes, merged into the marker by rank 0


class CheckpointDamaged(UserError):
    """A checkpoint whose files do not match the sizes and digests recorded when it was saved."""


def file_owner(relative: str) -> int:
    """The rank that hashes a file: the rank in its name (``data_state_rank3.json``, ``fsdp/rank3.json``), else 0."""
    match = _RANK_IN_NAME.search(Path(relative).name)
    return int(match.group(1)) if match else 0


def file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint but its marker, as paths relative to the folder."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MARKER and not p.name.startswith(".files-rank")
    )


def check_files(folder: Path, rank: int = 0, world: int = 1) -> tuple[int, str] | None:
    """The first file of ``folder`` (its index in the sorted record, and what is wrong) that this rank's share of
    the check finds damaged; None when its share is intact. Missing and unrecorded files are everyone's share."""
    try:
        marker = read_marker(folder)
    except (OSError, ValueError) as exc:
        return -1, f"cannot be read ({exc})"
    recorded = marker.get("files")
    if not isinstance(recorded, dict):
        return None  # written before the records: nothing to check against (logged by the caller)
    names = sorted(recorded)
    for index, name in enumerate(names):
        path = folder / name
        if not path.is_file():
            return index, "is missing"
        if file_owner(name) % world != rank:
            continue
        expected = recorded[name]
        size = path.stat().st_size
        if size != expected["size"]:
            return index, f"has {size} bytes where {expected['size']} were written"
        if file_record(path)["sha256"] != expected["sha256"]:
            return index, "does not match the sha256 recorded when it was written"
    extra = sorted(set(checkpoint_files(folder)) - set(names))
    if extra:
        return len(names), f"holds {extra[0]}, a file it was not saved with"
    return None


def damage_of(folder: Path, collective) -> str | None:
    """Collective: every rank checks its share of ``folder``'s files; all get the first problem as one phrase."""
    found = check_files(folder, collective.rank, collective.world)
    first = collective.smallest(found[0] + 1 if found else 1 << 40)
    if first == 1 << 40:
        return None
    if found and found[0] + 1 == first:
        what = found[1]
    else:  # another rank's share: the owner logs the details
        what = "does not match its record (size or sha256)"
    if first == 0:
        return f"{MARKER} {what}" if found else f"{MARKER} cannot be read"
    names = sorted((marker_or_none(folder) or {}).get("files", {}))
    return f"{names[first - 1]} {what}" if first - 1 < len(names) else what


def choose_intact(output_dir: str | os.PathLike, value: str | None, collective) -> Path | None:
    """Collective: rank 0 cleans stale saves and resolves ``value``; every rank checks its share of the chosen
    checkpoint's files against their records. ``latest`` passes over damaged checkpoints to the newest intact one
    (and sets them aside as ``damaged-*``); a named checkpoint that is damaged raises :class:`CheckpointDamaged`
    naming the file and the newest intact older checkpoint. Every rank gets the same answer."""
    candidates: list[tuple[int, Path]] = []
    if collective.rank == 0:
        clean_stale(output_dir)
        if value == "latest":
            candidates = complete_checkpoints(output_dir)[::-1]
            if not candidates:
                log.info(
                    "--resume_from_checkpoint latest: no complete checkpoint in %s; starting at step 0", output_dir
                )
        elif value:
            found = resolve_resume(output_dir, value)
            named = step_of(found)
            if named < 0:  # a folder named otherwise: its marker says the step (damage is found below)
                named = int((marker_or_none(found) or {}).get("step", 1 << 40))
            candidates = [(named, found)] + [c for c in complete_checkpoints(output_dir)[::-1] if c[0] < named]

    count = collective.number(len(candidates))
    damaged: list[tuple[Path, str]] = []
    for i in range(count):
        step = collective.number(candidates[i][0] if collective.rank == 0 else 0)
        folder = Path(collective.text(str(candidates[i][1]) if collective.rank == 0 else None))
        problem = damage_of(folder, collective)
        if problem is None:
            if damaged and value != "latest":
                bad, why = damaged[0]
                raise CheckpointDamaged(
                    f"{bad} is damaged: {why}; the newest intact older checkpoint is {folder}: "
                    f"resume with --resume_from_checkpoint {folder}"
                )
            if collective.rank == 0:
                if "files" not in read_marker(folder):
                    log.warning("%s was saved before checkpoints recorded their files; not checked", folder)
                set_aside_newer(output_dir, step, dict(damaged))
            return folder
        damaged.append((folder, problem))
        if value == "latest" and collective.rank == 0:
            log.warning("%s is damaged (%s); trying the checkpoint before it", folder, problem)
    if damaged:
        bad, why = damaged[0]
        raise CheckpointDamaged(
            f"{bad} is damaged: {why}; no intact checkpoint is older: start without --resume_from_checkpoint"
            if value != "latest"
            else f"every checkpoint in {output_dir} is damaged (the newest: {bad}: {why}); "
            "start over with --overwrite_output_dir (the damaged ones are moved aside, not deleted)"
        )
    return None
