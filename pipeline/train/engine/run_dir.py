"""The run's folder: who writes it, which run it holds, and whether this launch may start, resume or overwrite.

A training run owns its ``--output_dir``.  :class:`RunDirectory` decides, before
anything is built or loaded:

- the lease (``.lease.json``: host, pid, renewal, the same lease extraction takes
  per rank): a second launch on a folder a live run writes is refused, naming it;
- fresh or resumed: a fresh start over a folder that holds checkpoints is refused
  (naming the newest one and the two ways on), unless ``--overwrite_output_dir``,
  which moves what the old run wrote into ``overwritten-{stamp}/`` — never deletes it, and
  leaves everything else (the user's own files) in place;
- the run's identity (``run.json``: its id): every checkpoint records it, so
  pruning removes only this run's checkpoints, never another's;
- ``config.yaml``: the resolved settings, compared on resume before any weight
  is loaded (``pipeline.train.recipe``), with the model identified by content.

Rank 0 decides and writes; the other ranks learn the outcome through one broadcast
(a refusal reaches every rank as the same one-line error).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

from pipeline.common.collective import Collective
from pipeline.errors import UserError
from pipeline.families import FAMILIES
from pipeline.files import read_json_object, write_json_file
from pipeline.shards.lease import RankLease
from pipeline.shards.storage import Store
from pipeline.train.engine.checkpoint.folders import aside_path, complete_checkpoints

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LEASE_FILE = ".lease.json"
OVERWRITTEN = "overwritten-"
# what a run writes at the top of its folder: checkpoints (and the ones set aside), its settings, identity and
# summary, exports, validation images, the first-batch sheet, logs/ (the default --logging_dir); the run's own
# --logging_dir and --data_trace are added per run
RUN_OUTPUTS = re.compile(
    r"^(checkpoint-\d+|\.checkpoint-\d+\.incomplete|(abandoned|damaged)-.+|config\.yaml|config-before-step-.+\.yaml"
    r"|run\.json|run_summary\.json|first_batch\.png|validation|logs|transformer|"
    + "|".join(re.escape(name) for family in FAMILIES.values() for name in family.lora_files.values())
    + ")$"
)


def written_by_a_run(name: str, run_files: tuple[str, ...] = ()) -> bool:
    """Whether a top-level entry of a run folder is one a training run writes (``--overwrite_output_dir`` moves
    only those)."""
    return bool(RUN_OUTPUTS.match(name)) or name in run_files


def run_names(config) -> tuple[str, ...]:
    """The top-level names of ``--output_dir`` that this run writes besides :data:`RUN_OUTPUTS`: its tracker folder
    (``--logging_dir``, relative to the folder) and its ``--data_trace`` when they lie inside it."""
    base = Path(config.output_dir).resolve()
    names = []
    for path in (base / config.tracking.logging_dir, config.data.trace_path):
        full = Path(path).expanduser().resolve() if path else base
        if full != base and full.is_relative_to(base):
            names.append(full.relative_to(base).parts[0])
    return tuple(names)


class RunDirectory:
    """One run's ``--output_dir`` (collective: every rank builds it and calls :meth:`open` and :meth:`close`)."""

    def __init__(self, output_dir: str | os.PathLike, collective: Collective, run_files: tuple[str, ...] = ()):
        self.root = Path(output_dir)
        self.run_files = run_files  # more names this run writes at the top of the folder (its logs, its trace)
        self.collective = collective
        self.lease: RankLease | None = None
        self.run_id: str | None = None

    # ---- opening --------------------------------------------------------------------------------------------------
    def open(self, resume_from: str | None, overwrite: bool = False, fresh_check: bool = True) -> None:
        """Take the folder: the lease, then the fresh-start rules. ``fresh_check=False``: an export, which writes
        next to the checkpoints and never starts a run."""
        if overwrite and resume_from == "latest":
            raise UserError(
                "--overwrite_output_dir moves the old run aside and --resume_from_checkpoint latest resumes it: "
                "give one of them"
            )
        with self.collective.phase("taking the run folder (rank 0: the lease, the checkpoints there)"):
            self.collective.on_rank0(lambda: self._take(resume_from, overwrite, fresh_check))
        self._require_shared()

    def _require_shared(self) -> None:
        """Every rank must see the folder rank 0 took: checkpoints written where another node cannot read them would
        fail the first resume hours later. Checked by the lease rank 0 just wrote (its run token)."""
        token = self.collective.text(self.lease.mine["run_id"] if self.lease else None)
        if self.collective.world == 1:
            return
        try:
            seen = read_json_object(self.root / LEASE_FILE).get("run_id")
        except (OSError, ValueError):  # missing or unreadable here: not the folder rank 0 wrote
            seen = None
        self.collective.require_seen(
            seen == token,
            f"{self.root.resolve()}/{LEASE_FILE}, which rank 0 has just written: --output_dir must be one folder "
            "that every node shares (a shared filesystem; a relative path names each node's own working folder)",
        )

    def _take(self, resume_from: str | None, overwrite: bool, fresh_check: bool) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--output_dir {self.root} is a file; give a folder (it is created when missing)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--output_dir {self.root}: cannot create it ({exc.strerror or exc})") from None
        self.lease = RankLease(Store(str(self.root)), 0, path=LEASE_FILE, what=f"the training run folder {self.root}")
        if not fresh_check:
            return
        found = complete_checkpoints(self.root)
        if found and overwrite:
            self._move_aside()
        elif found and not resume_from:
            raise UserError(
                f"--output_dir {self.root} holds the checkpoints of a run (newest: {found[-1][1].name}): continue it "
                "with --resume_from_checkpoint latest, or start over with --overwrite_output_dir (the old run is "
                "moved into a subfolder, not deleted)"
            )

    def _move_aside(self) -> Path:
        """What the old run wrote (:func:`written_by_a_run`) into ``overwritten-{stamp}/``; everything else — the
        user's own files, models, shards, ``.git``, a log being written — stays where it is, and is said so."""
        target = aside_path(self.root, OVERWRITTEN)
        target.mkdir()
        left = []
        for child in sorted(self.root.iterdir()):
            if child == target or child.name == LEASE_FILE or child.name.startswith(OVERWRITTEN):
                continue
            if written_by_a_run(child.name, self.run_files):
                os.replace(child, target / child.name)
            else:
                left.append(child.name)
        log.warning("--overwrite_output_dir: the previous run in %s was moved to %s", self.root, target)
        if left:
            log.warning(
                "--overwrite_output_dir: %d entr%s not written by a run left in place: %s%s", len(left),
                "y" if len(left) == 1 else "ies", ", ".join(left[:8]), " …" if len(left) > 8 else "",
            )  # fmt: skip
        return target

    # ---- the run's identity -------------------------------------------------------------------------------------
    def adopt(self, marker: dict[str, Any] | None) -> str:
        """The run's id: the resumed checkpoint's (its lineage goes on), or a new one for a fresh start. Rank 0
        writes ``run.json``; every rank gets the id."""

        def decide() -> str:
            resumed = marker.get("run_id") if marker else None
            run_id = resumed if isinstance(resumed, str) else uuid.uuid4().hex
            adopted = bool(marker) and not resumed  # an older version's checkpoint: its unrecorded lineage goes on
            write_json_file(self.root / RUN_FILE, {"run_id": run_id, "adopted_unrecorded": adopted})
            return run_id

        with self.collective.phase("recording the run's identity (rank 0)"):
            self.run_id = self.collective.text_from_rank0(decide)
        return self.run_id

    def owns(self, marker: dict[str, Any]) -> bool:
        """Whether a checkpoint (by its marker) is of this run's lineage; an older version's checkpoints, which
        record no run, are this run's when it resumed one of them."""
        recorded = marker.get("run_id")
        if recorded is None:
            try:
                return bool(read_json_object(self.root / RUN_FILE).get("adopted_unrecorded"))
            except (OSError, ValueError):
                return False
        return recorded == self.run_id

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None
