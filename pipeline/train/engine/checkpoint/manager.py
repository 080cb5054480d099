"""Checkpoint folders: ``checkpoint-{step}/`` published atomically, found, pruned.

All ranks write into a hidden temporary folder; once every rank is done, rank 0
adds ``checkpoint.json`` and renames the folder into place, so a crash never
leaves a folder that ``--resume_from_checkpoint latest`` would take as complete.

``checkpoint.json`` records every file's size and sha256 (each rank hashes the
files it wrote, in parallel).  A resume checks them before it reads anything:
``latest`` passes over a damaged checkpoint to the newest intact one, a named
checkpoint that is damaged stops with one line naming the file and the
checkpoint to resume from instead.  Nothing in a checkpoint is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = "checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_RANK_IN_NAME = re.compile(r"rank(\d+)")
_HASH_LIST = ".files-rank{rank}.json"  # one rank's hashes, merged into the marker by rank 0


class CheckpointDamaged(ValueError):
    """A checkpoint whose files do not match the sizes and digests recorded when it was saved."""


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
        raise FileNotFoundError(
            f"{value} is not a complete checkpoint (no {MARKER}), neither as a path nor inside {output_dir}"
        )
    return path


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text())


def write_json_file(path: str | os.PathLike, value: Any) -> None:
    """Write JSON through a temporary file and rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    rank: int,
    barrier: Callable[[], None],
    write_rank_files: Callable[[Path], None],
    marker: dict[str, Any],
    total_limit: int | None = None,
    world: int = 1,
) -> Path:
    """Collective: every rank calls it; returns the published folder."""
    staging = staging_dir(output_dir, step)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    write_rank_files(staging)
    barrier()
    mine = {f: file_record(staging / f) for f in checkpoint_files(staging) if file_owner(f) % world == rank}
    write_json_file(staging / _HASH_LIST.format(rank=rank), mine)
    barrier()
    final = final_dir(output_dir, step)
    if rank == 0:
        files: dict[str, Any] = {}
        for r in range(world):
            listing = staging / _HASH_LIST.format(rank=r)
            files.update(json.loads(listing.read_text()))
            listing.unlink()
        write_json_file(staging / MARKER, {"step": step, **marker, "files": dict(sorted(files.items()))})
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        prune(output_dir, total_limit)
        log.info("saved %s", final)
    barrier()
    return final


def check_files(folder: Path, rank: int = 0, world: int = 1) -> tuple[int, str] | None:
    """The first file of ``folder`` (its index in the sorted record, and what is wrong) that this rank's share of
    the check finds damaged; None when its share is intact. Missing and unrecorded files are everyone's share."""
    try:
        marker = read_marker(folder)
    except (OSError, ValueError) as exc:
        return -1, f"{MARKER} cannot be read ({exc})"
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


def prune(output_dir: str | os.PathLike, total_limit: int | None) -> None:
    """Keep the newest ``total_limit`` complete checkpoints.

    The marker goes first: a prune cut short leaves a folder ``latest`` ignores,
    never a half-deleted one it would take as complete.
    """
    if not total_limit or total_limit <= 0:
        return
    found = complete_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - total_limit)]:
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


def set_aside_newer(output_dir: str | os.PathLike, step: int) -> list[Path]:
    """Rename complete checkpoints newer than ``step`` (a run abandoned by resuming earlier) out of the way.

    Otherwise ``latest`` would point back into the abandoned run and pruning
    would count its checkpoints as newer than the ones this run saves.
    """
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for found_step, path in complete_checkpoints(output_dir):
        if found_step > step:
            target = path.with_name(f"abandoned-{stamp}-{path.name}")
            os.replace(path, target)
            moved.append(target)
            log.warning("resuming at step %d: %s belongs to an abandoned run, moved to %s", step, path, target)
    return moved


def damage_of(folder: Path, rank: int, world: int, device) -> str | None:
    """Collective: every rank checks its share of ``folder``'s files; all get the first problem as one phrase."""
    import torch

    found = check_files(folder, rank, world)
    code = torch.tensor([found[0] + 1 if found else 1 << 40], dtype=torch.long, device=device)
    if world > 1:
        torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MIN)
    first = int(code.item())
    if first == 1 << 40:
        return None
    if found and found[0] + 1 == first:
        what = found[1]
    else:  # another rank's share: the owner logs the details
        what = "does not match its record (size or sha256)"
    if first == 0:
        return f"{MARKER} {what}" if found else f"{MARKER} cannot be read"
    names = sorted(read_marker(folder).get("files", {}))
    name = names[first - 1] if first - 1 < len(names) else "an unrecorded file"
    return f"{name} {what}" if first - 1 < len(names) else what


def resume_point(output_dir: str | os.PathLike, value: str | None, rank: int, world: int, device) -> Path | None:
    """Collective: rank 0 cleans stale saves and resolves ``value``; every rank checks its share of the chosen
    checkpoint's files against their records. ``latest`` passes over damaged checkpoints to the newest intact one;
    a named checkpoint that is damaged raises :class:`CheckpointDamaged` naming the file and the newest intact
    older checkpoint. Every rank gets the same answer (the step travels as a tensor, no pickle)."""
    import torch

    def shared(number: int) -> int:
        if world == 1:
            return number
        value_t = torch.tensor([number], dtype=torch.long, device=device)
        torch.distributed.broadcast(value_t, src=0)
        return int(value_t.item())

    candidates: list[tuple[int, Path]] = []
    if rank == 0:
        clean_stale(output_dir)
        if value == "latest":
            candidates = complete_checkpoints(output_dir)[::-1]
            if not candidates:
                log.info(
                    "--resume_from_checkpoint latest: no complete checkpoint in %s; starting at step 0", output_dir
                )
        elif value:
            found = resolve_resume(output_dir, value)
            named = int(read_marker(found)["step"])
            candidates = [(named, found)] + [c for c in complete_checkpoints(output_dir)[::-1] if c[0] < named]

    def shared_path(path: Path | None) -> Path:
        """Rank 0's path on every rank (a named checkpoint may lie outside ``output_dir``): bytes as a tensor."""
        if world == 1:
            return path
        data = list(str(path).encode("utf-8")) if rank == 0 else []
        size = shared(len(data))
        buffer = torch.tensor(data if rank == 0 else [0] * size, dtype=torch.uint8, device=device)
        torch.distributed.broadcast(buffer, src=0)
        return Path(bytes(buffer.tolist()).decode("utf-8"))

    count = shared(len(candidates))
    damaged: list[tuple[Path, str]] = []
    for i in range(count):
        step = shared(candidates[i][0] if rank == 0 else 0)
        folder = shared_path(candidates[i][1] if rank == 0 else None)
        problem = damage_of(folder, rank, world, device)
        if problem is None:
            if damaged and value != "latest":
                bad, why = damaged[0]
                raise CheckpointDamaged(
                    f"{bad} is damaged: {why}; the newest intact older checkpoint is {folder}: "
                    f"resume with --resume_from_checkpoint {folder}"
                )
            if rank == 0:
                if "files" not in read_marker(folder):
                    log.warning("%s was saved before checkpoints recorded their files; not checked", folder)
                set_aside_newer(output_dir, step)
            return folder
        damaged.append((folder, problem))
        if value == "latest" and rank == 0:
            log.warning("%s is damaged (%s); trying the checkpoint before it", folder, problem)
    if damaged:
        bad, why = damaged[0]
        raise CheckpointDamaged(
            f"{bad} is damaged: {why}; no intact checkpoint is older: start without --resume_from_checkpoint"
            if value != "latest"
            else f"every checkpoint in {output_dir} is damaged (the newest: {bad}: {why}); "
            "start without --resume_from_checkpoint"
        )
    return None


class Checkpointer:
    """Collective save and load of named parts (``save(folder)`` / ``load(folder)``) into ``checkpoint-{step}/``."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        rank: int,
        barrier: Callable[[], None],
        parts: dict[str, Any],
        marker: dict[str, Any],
        total_limit: int | None = None,
        world: int = 1,
    ):
        self.output_dir, self.rank, self.barrier, self.world = output_dir, rank, barrier, world
        self.parts, self.marker, self.total_limit = parts, marker, total_limit

    def save(self, step: int) -> Path:
        def write(folder: Path) -> None:
            for part in self.parts.values():
                part.save(folder)

        return save_checkpoint(
            self.output_dir, step, self.rank, self.barrier, write, self.marker, self.total_limit, self.world
        )

    def load(self, folder: Path) -> int:
        for part in self.parts.values():
            part.load(folder)
        return int(read_marker(folder)["step"])
