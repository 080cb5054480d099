"""A property of the run's lifecycle, on integers: random sequences of fresh starts, resumes (``latest`` and by
name), ``--overwrite_output_dir``, stops after a save (SIGTERM), kills at any point of a save (SIGKILL), damage
to the newest checkpoint, non-finite state and a concurrent second start never lose an intact checkpoint of
another run, never resume from a damaged or non-finite one, and never let two runs write one folder.

The run is the real :class:`RunDirectory` and :class:`CheckpointManager`; the model is an integer whose
checkpoint file carries a unique token, so every checkpoint can be found again wherever it was moved."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import pytest

from pipeline.common.collective import Collective
from pipeline.errors import UserError
from pipeline.shards.lease import LeaseHeld
from pipeline.train.engine.checkpoint import folders, integrity
from pipeline.train.engine.checkpoint import manager as checkpoint_manager
from pipeline.train.engine.run_dir import RunDirectory

ALONE = Collective(0, 1)
LIMIT = 2


class Killed(BaseException):
    """SIGKILL in the middle of a save: nothing after it runs."""


class Weights:
    """The 'model': a value and whether it is finite; its file carries a unique token per save."""

    def __init__(self, kill_after_bytes: int | None = None):
        self.value, self.finite, self.kill_after_bytes = 0, True, kill_after_bytes
        self.loaded: dict | None = None

    def save(self, folder: Path) -> None:
        body = json.dumps({"value": self.value, "finite": self.finite, "token": uuid.uuid4().hex}).encode()
        if self.kill_after_bytes is not None:
            (folder / "weights.json").write_bytes(body[: self.kill_after_bytes])
            raise Killed()
        (folder / "weights.json").write_bytes(body)

    def load(self, folder: Path) -> None:
        self.loaded = json.loads((folder / "weights.json").read_text())
        assert self.loaded["finite"], f"resumed from non-finite state in {folder}"
        self.value = self.loaded["value"]


def every_checkpoint(root: Path) -> dict[str, tuple[str | None, bool]]:
    """token -> (run id, intact) of every checkpoint anywhere under the folder (moved aside ones included)."""
    found = {}
    for weights in root.rglob("weights.json"):
        folder = weights.parent
        try:
            token = json.loads(weights.read_text())["token"]
        except (ValueError, KeyError):
            continue
        marker = folders.marker_or_none(folder)
        intact = marker is not None and integrity.check_files(folder) is None
        found[token] = ((marker or {}).get("run_id"), intact)
    return found


def run(out: Path, resume, overwrite: bool, steps: int, kill_after, nan_at, launched: dict) -> None:
    """One launch: take the folder, resume, train ``steps`` integer steps saving every 2, close. The run's id goes
    into ``launched`` as soon as it has one (a killed run has pruned its own checkpoints by then)."""
    folder = RunDirectory(out, ALONE)
    try:
        folder.open(resume, overwrite)
        weights = Weights()
        manager = checkpoint_manager.CheckpointManager(out, ALONE, run=folder, every=2, total_limit=LIMIT)
        manager.choose(resume)
        launched["run_id"] = folder.run_id
        manager.register({"weights": weights}, finite=lambda: None if weights.finite else "the trainable weight w")
        start = manager.load()
        for step in range(start, start + steps):
            weights.value += 1
            if nan_at is not None and step - start == nan_at:
                weights.finite = False
            if kill_after is not None and step - start == steps - 1:
                weights.kill_after_bytes = kill_after
            if manager.due(step + 1, start + steps):
                manager.save(step + 1)
    finally:
        folder.close()


@pytest.mark.parametrize("seed", range(8))
def test_random_lifecycles_never_lose_or_poison_a_checkpoint(tmp_path, seed):
    rng = random.Random(seed)
    out = tmp_path / "run"
    for _ in range(14):
        before = every_checkpoint(out) if out.exists() else {}
        has_checkpoints = bool(folders.complete_checkpoints(out))
        action = rng.choice(["fresh", "latest", "named", "overwrite", "kill", "damage", "nan", "concurrent"])
        launched: dict = {}
        if action == "damage":
            newest = folders.complete_checkpoints(out)
            if newest:
                target = newest[-1][1] / "weights.json"
                target.write_bytes(target.read_bytes()[:-3])
            continue
        if action == "concurrent":
            holder = RunDirectory(out, ALONE)
            holder.open("latest")
            try:
                with pytest.raises(LeaseHeld):
                    RunDirectory(out, ALONE).open("latest")
            finally:
                holder.close()
            continue
        resume = {"fresh": None, "overwrite": None, "nan": "latest", "kill": "latest", "latest": "latest"}.get(action)
        if action == "named":
            names = [p.name for _, p in folders.complete_checkpoints(out)]
            resume = rng.choice(names) if names else None
        try:
            run(
                out, resume, action == "overwrite", rng.randint(1, 5),
                kill_after=rng.randint(0, 30) if action == "kill" else None,
                nan_at=rng.randint(0, 3) if action == "nan" else None, launched=launched,
            )  # fmt: skip
        except UserError as refused:
            assert action in ("fresh", "named", "latest", "nan", "kill") and (
                has_checkpoints or isinstance(refused, integrity.CheckpointDamaged)
            ), refused
        except (Killed, checkpoint_manager.NonFiniteState):
            pass
        after = every_checkpoint(out)
        for token, (owner, intact) in before.items():
            if token not in after:  # only a run's own pruning removes its checkpoints
                assert owner is not None and owner == launched.get("run_id"), (action, token, owner, launched)
            elif intact:
                assert after[token][1], f"{action}: an intact checkpoint was damaged"
