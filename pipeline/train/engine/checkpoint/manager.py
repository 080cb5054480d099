"""The checkpoint manager: a run's checkpoints, from choosing the one to resume to saving and pruning.

One object owns a run's resume and its saves (torchtitan's ``CheckpointManager`` is
the model). Built before anything else, it chooses the checkpoint to resume
(:meth:`CheckpointManager.choose`: the newest intact one, or the named one checked
intact; the marker's mode against the run's; the recipe; the run's lineage
adopted), before any weight loads. The run then registers its named parts (each
saves and loads its own files, no pickle) and :meth:`CheckpointManager.load` loads
them and truncates the data trace to the resumed step. Saving is collective: all
ranks write into a hidden staging folder, each hashes its share, rank 0 writes the
marker and renames the folder into place, so a crash never leaves a folder that
``latest`` would take as complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.files import write_json_file
from pipeline.train.engine.checkpoint.folders import MARKER, final_dir, marker_or_none, prune, read_marker, staging_dir
from pipeline.train.engine.checkpoint.integrity import (
    HASH_LIST,
    CheckpointDamaged,
    checkpoint_files,
    choose_intact,
    damage_of,
    file_owner,
    file_record,
)
from pipeline.train.stream.trace import truncate_trace

log = logging.getLogger(__name__)

# the marker's keys that say how a checkpoint was saved, and why another run mode cannot resume it
MODE_REFUSALS = {
    "fsdp": lambda folder, saved: (
        f"{folder} was saved {'with' if saved else 'without'} FSDP; resume it the same way (--parallelism), or "
        "export it with --export_checkpoint and start from the export"
    ),
    "lora": lambda folder, saved: (
        f"{folder} holds a {'LoRA' if saved else 'full fine-tuning'} state; give the run's own --use_peft_lora setting"
    ),
}


class NonFiniteState(RuntimeError):
    """The trainable weights or the optimizer's state hold NaN/Inf: saving them would poison every resume."""


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
        write_json_file(staging / HASH_LIST.format(rank=rank), mine)
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
        listing = staging / HASH_LIST.format(rank=r)
        files.update(json.loads(listing.read_text()))
        listing.unlink()
    write_json_file(staging / MARKER, {"step": step, **marker, "files": dict(sorted(files.items()))})
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    prune(output_dir, total_limit, owns)
    log.info("saved %s", final)


class CheckpointManager:
    """Every checkpoint of one run: which one it resumes, when it saves, the save itself, pruning its lineage.

    ``run``: the run's folder (:class:`~pipeline.train.engine.run_dir.RunDirectory`: its id, its lineage; None for
    a bare folder, whose checkpoints are all the run's). ``mode``: what every marker records of how the run saves
    (``world_size``, ``fsdp``, ``lora``, ``data_only``); a checkpoint of another ``fsdp`` or ``lora`` is refused.
    ``trace_path``: the data trace, cut back to the resumed step.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        collective,
        *,
        run=None,
        mode: dict[str, Any] | None = None,
        every: int | None = None,
        total_limit: int | None = None,
        trace_path: str | None = None,
    ):
        self.output_dir, self.collective, self.run = Path(output_dir), collective, run
        self.mode, self.every, self.total_limit, self.trace_path = dict(mode or {}), every, total_limit, trace_path
        self.parts: dict[str, Any] = {}
        self.finite: Callable[[], str | None] = lambda: None
        self.chosen: Path | None = None  # the checkpoint this run resumes (or exports)
        self.exporting = False

    # ---- the resume ---------------------------------------------------------------------------------------------
    def choose(self, value: str | None, check_recipe: Callable[[int], None] | None = None) -> Path | None:
        """Collective, before anything is built: the checkpoint ``--resume_from_checkpoint value`` names, checked
        intact; its mode against the run's and (``check_recipe(step)``) the run's settings against the saved
        ones; the run's lineage adopted (the resumed one's, or a new one). None: a fresh start."""
        with self.collective.phase(f"choosing the checkpoint to resume ({value}; rank 0 lists and checks them)"):
            self.chosen = choose_intact(self.output_dir, value, self.collective)
        marker = read_marker(self.chosen) if self.chosen is not None else None
        if marker is not None:
            self.check_mode(self.chosen, marker)
            if check_recipe is not None:
                check_recipe(int(marker.get("step", 0)))
        if self.run is not None:
            self.run.adopt(marker)
        return self.chosen

    def choose_export(self, folder: Path) -> None:
        """``--export_checkpoint``: ``folder``'s mode checked against the run's before anything is built; it is
        checked intact when it loads, and nothing of the run's own lineage changes."""
        self.chosen, self.exporting = folder, True
        self.check_mode(folder, marker_or_none(folder) or {})

    def check_mode(self, folder: Path, marker: dict[str, Any]) -> None:
        """Refuse, before anything loads, a checkpoint saved in another mode than the run's (FSDP or not, LoRA or
        not)."""
        for key, refusal in MODE_REFUSALS.items():
            if key in marker and key in self.mode and bool(marker[key]) != bool(self.mode[key]):
                raise CheckpointDamaged(refusal(folder, bool(marker[key])))

    def register(self, parts: dict[str, Any], finite: Callable[[], str | None] | None = None) -> None:
        """The run's state by name, each part saving and loading its own files; ``finite``: a per-rank check of
        the state to save (None: finite; else what is not), agreed by all ranks."""
        self.parts.update(parts)
        if finite is not None:
            self.finite = finite

    def load(self) -> int:
        """Collective: every registered part loaded from the chosen checkpoint (an export's checked intact
        first), the data trace cut back to its step; the step to go on from (0: a fresh start)."""
        if self.chosen is None:
            return 0
        if self.exporting:
            problem = damage_of(self.chosen, self.collective)
            if problem:
                raise CheckpointDamaged(f"{self.chosen} is damaged: {problem}")
        for part in self.parts.values():
            part.load(self.chosen)
        step = int(read_marker(self.chosen)["step"])
        if not self.exporting:
            log.info("resumed from %s (step %d)", self.chosen, step)
            if self.collective.rank == 0:
                truncate_trace(self.trace_path, step)
            self.collective.barrier()
        return step

    # ---- saving -------------------------------------------------------------------------------------------------
    def due(self, step: int, last: int) -> bool:
        """Whether optimizer step ``step`` (1-based) ends with a save: every ``every`` steps and at the end."""
        return step == last or (self.every is not None and step % self.every == 0)

    def owns(self, marker: dict[str, Any]) -> bool:
        return self.run.owns(marker) if self.run is not None else True

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

        marker = {**self.mode, "run_id": self.run.run_id} if self.run is not None else dict(self.mode)
        return save_checkpoint(self.output_dir, step, self.collective, write, marker, self.total_limit, self.owns)
