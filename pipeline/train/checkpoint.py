"""Checkpoint folders: ``checkpoint-{step}/`` published atomically, found, pruned.

All ranks write into a hidden temporary folder; once every rank is done, rank 0
adds ``checkpoint.json`` and renames the folder into place, so a crash never
leaves a folder that ``--resume_from_checkpoint latest`` would take as complete.
"""

from __future__ import annotations

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


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    rank: int,
    barrier: Callable[[], None],
    write_rank_files: Callable[[Path], None],
    marker: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Collective: every rank calls it; returns the published folder."""
    staging = staging_dir(output_dir, step)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    write_rank_files(staging)
    barrier()
    final = final_dir(output_dir, step)
    if rank == 0:
        write_json_file(staging / MARKER, {"step": step, **marker})
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        prune(output_dir, total_limit)
        log.info("saved %s", final)
    barrier()
    return final


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
    """Remove the staging folders of saves that a crash interrupted (rank 0, before any save)."""
    root = Path(output_dir)
    stale = sorted(root.glob(".checkpoint-*.incomplete")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed the unfinished checkpoint %s", path)
    return stale


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


def resume_point(output_dir: str | os.PathLike, value: str | None, rank: int, world: int, device) -> Path | None:
    """Collective: rank 0 cleans stale saves, resolves ``value`` once and sets abandoned checkpoints aside;
    every rank gets the same answer (the step travels as a tensor, no pickle)."""
    import torch

    step, found = -1, None
    if rank == 0:
        clean_stale(output_dir)
        found = resolve_resume(output_dir, value)
        if found is not None:
            step = int(read_marker(found)["step"])
            set_aside_newer(output_dir, step)
    if world > 1:
        shared = torch.tensor([step], dtype=torch.long, device=device)
        torch.distributed.broadcast(shared, src=0)
        step = int(shared.item())
    if step < 0:
        return None
    return found if rank == 0 and found is not None else final_dir(output_dir, step)


# ---------------------------------------------------------------------------------------------
# what goes into a checkpoint: named parts, each saving and loading its own files


class JsonPart:
    """A JSON-able state in one file: per rank (``{rank}`` in the name) or written by rank 0 and read by all."""

    def __init__(self, filename: str, get: Callable[[], Any], put: Callable[[Any], None], rank: int, optional=False):
        self.filename, self.get, self.put, self.rank, self.optional = filename, get, put, rank, optional
        self.per_rank = "{rank}" in filename

    def _file(self, folder: Path) -> Path:
        return folder / self.filename.format(rank=self.rank)

    def save(self, folder: Path) -> None:
        if self.per_rank or self.rank == 0:
            write_json_file(self._file(folder), self.get())

    def load(self, folder: Path) -> None:
        path = self._file(folder)
        if self.optional and not path.is_file():  # written by an older version
            return
        self.put(json.loads(path.read_text()))


class RngPart:
    """This rank's torch RNG states (CPU and CUDA), as safetensors."""

    def __init__(self, rank: int):
        self.rank = rank

    def save(self, folder: Path) -> None:
        import torch
        from safetensors.torch import save_file

        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(state, str(folder / f"rng_rank{self.rank}.safetensors"))

    def load(self, folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        path = folder / f"rng_rank{self.rank}.safetensors"
        if not path.is_file():  # resumed on more ranks than saved: this rank keeps its seeded generators
            log.info("%s has no RNG state for rank %d (saved on fewer ranks); kept the seeded one", folder, self.rank)
            return
        state = load_file(str(path))
        torch.set_rng_state(state["torch"])
        cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)


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
    ):
        self.output_dir, self.rank, self.barrier = output_dir, rank, barrier
        self.parts, self.marker, self.total_limit = parts, marker, total_limit

    def save(self, step: int) -> Path:
        def write(folder: Path) -> None:
            for part in self.parts.values():
                part.save(folder)

        return save_checkpoint(self.output_dir, step, self.rank, self.barrier, write, self.marker, self.total_limit)

    def load(self, folder: Path) -> int:
        for part in self.parts.values():
            part.load(folder)
        return int(read_marker(folder)["step"])
