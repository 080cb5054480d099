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

from pipeline.errors import UserError
from pipeline.shards.storage import atomic_write

log = logging.getLogger(__name__)

MARKER = "checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_RANK_IN_NAME = re.compile(r"rank(\d+)")
_HASH_LIST = ".files-rank{rank}.json"  # one rank's hashes, merged into the marker by rank 0


class CheckpointDamaged(UserError):
    """A checkpoint whose files do not match the sizes and digests recorded when it was saved."""


class NonFiniteState(RuntimeError):
    """The trainable weights or the optimizer's state hold NaN/Inf: saving them would poison every resume."""


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


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file that must hold an object (ValueError otherwise, as for text that is not JSON)."""
    value = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, found {type(value).__name__}")
    return value


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


def write_json_file(path: str | os.PathLike, value: Any) -> None:
    """JSON written atomically (``storage.atomic_write``)."""
    atomic_write(path, json.dumps(value).encode("utf-8"))


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
    collective,
    write_rank_files: Callable[[Path], None],
    marker: dict[str, Any],
    total_limit: int | None = None,
    owns: Callable[[dict[str, Any]], bool] = lambda marker: True,
) -> Path:
    """Collective: every rank calls it; returns the published folder."""
    rank, world, barrier = collective.rank, collective.world, collective.barrier
    staging = staging_dir(output_dir, step)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    with collective.phase(f"writing checkpoint-{step} (each rank its files)"):
        write_rank_files(staging)
        barrier()
    with collective.phase(f"hashing checkpoint-{step}'s files (each rank its share)"):
        mine = {f: file_record(staging / f) for f in checkpoint_files(staging) if file_owner(f) % world == rank}
        write_json_file(staging / _HASH_LIST.format(rank=rank), mine)
        barrier()
    final = final_dir(output_dir, step)
    with collective.phase(f"publishing checkpoint-{step} (rank 0: its marker, the rename, pruning old ones)"):
        if rank == 0:
            _publish(staging, final, step, world, marker, output_dir, total_limit, owns)
        barrier()
    return final


def _publish(staging: Path, final: Path, step: int, world: int, marker: dict[str, Any], output_dir, total_limit,
             owns) -> None:  # fmt: skip
    """Rank 0: the ranks' file records into the marker, the staging folder renamed into place, old ones pruned."""
    files: dict[str, Any] = {}
    for r in range(world):
        listing = staging / _HASH_LIST.format(rank=r)
        files.update(json.loads(listing.read_text()))
        listing.unlink()
    write_json_file(staging / MARKER, {"step": step, **marker, "files": dict(sorted(files.items()))})
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    prune(output_dir, total_limit, owns)
    log.info("saved %s", final)


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


ABANDONED = "abandoned-"
DAMAGED = "damaged-"


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


def resume_point(output_dir: str | os.PathLike, value: str | None, collective) -> Path | None:
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


def check_mode(folder: Path, marker: dict[str, Any], fsdp: bool, lora: bool) -> None:
    """Refuse, before anything loads, a checkpoint saved in another mode than the run's (FSDP or not, LoRA or not)."""
    if "fsdp" in marker and bool(marker["fsdp"]) != fsdp:
        raise CheckpointDamaged(
            f"{folder} was saved {'with' if marker['fsdp'] else 'without'} FSDP; resume it the same way "
            "(--parallelism), or export it with --export_checkpoint and start from the export"
        )
    if "lora" in marker and bool(marker["lora"]) != lora:
        raise CheckpointDamaged(
            f"{folder} holds a {'LoRA' if marker['lora'] else 'full fine-tuning'} state; give the run's own "
            "--use_peft_lora setting"
        )


class CheckpointManager:
    """Every checkpoint of a run: when to save, the save itself (collective, refused from non-finite state), which
    checkpoint a resume takes, its integrity, and pruning within the run's lineage.

    ``parts``: named parts, each saving and loading its own files (no pickle).
    ``marker``: what the marker records besides the step and the files (the run's id and mode).
    ``finite``: a per-rank check of the state to save (None: finite; else what is not), agreed by all ranks.
    ``owns``: whether a marker is of this run's lineage (only those are pruned).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        collective,
        parts: dict[str, Any],
        marker: dict[str, Any],
        every: int | None = None,
        total_limit: int | None = None,
        finite: Callable[[], str | None] = lambda: None,
        owns: Callable[[dict[str, Any]], bool] = lambda marker: True,
    ):
        self.output_dir, self.collective = Path(output_dir), collective
        self.parts, self.marker, self.every, self.total_limit = parts, marker, every, total_limit
        self.finite, self.owns = finite, owns

    def due(self, step: int, last: int) -> bool:
        """Whether optimizer step ``step`` (1-based) ends with a save: every ``every`` steps and at the end."""
        return step == last or (self.every is not None and step % self.every == 0)

    def save(self, step: int) -> Path:
        """Collective: ``checkpoint-{step}/`` published atomically, then older checkpoints of the run pruned.

        Refused (:class:`NonFiniteState`, nothing written) when any rank's state is not finite: ``latest`` stays
        the newest finite checkpoint."""
        problem = self.finite()
        if self.collective.any(problem is not None):
            where = problem or "another rank's share of the state"
            raise NonFiniteState(
                f"step {step}: {where} is not finite (NaN/Inf); no checkpoint was written, the newest checkpoint "
                f"in {self.output_dir} is the last finite one. Lower the learning rate or check the data, then "
                "resume from it"
            )

        def write(folder: Path) -> None:
            for part in self.parts.values():
                part.save(folder)

        return save_checkpoint(self.output_dir, step, self.collective, write, self.marker, self.total_limit, self.owns)

    def find(self, value: str | None) -> Path | None:
        """Collective: the checkpoint ``--resume_from_checkpoint value`` names, checked intact (see resume_point)."""
        with self.collective.phase(f"choosing the checkpoint to resume ({value}; rank 0 lists and checks them)"):
            return resume_point(self.output_dir, value, self.collective)

    def check_intact(self, folder: Path) -> None:
        """Collective: refuse a damaged checkpoint given by name (an export)."""
        problem = damage_of(folder, self.collective)
        if problem:
            raise CheckpointDamaged(f"{folder} is damaged: {problem}")

    def load(self, folder: Path) -> int:
        for part in self.parts.values():
            part.load(folder)
        return int(read_marker(folder)["step"])
