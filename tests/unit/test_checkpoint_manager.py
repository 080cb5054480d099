"""The checkpoint manager (``engine/checkpoint/``): folders published atomically, recorded sizes and digests,
damaged checkpoints named or passed over, no file ever unpickled, leftovers of a killed prune removed, pruning
within the run's lineage, no checkpoint from non-finite state; and the FSDP shard files."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from helpers import PickleBomb

from pipeline.common.collective import Collective
from pipeline.errors import UserError
from pipeline.train.engine.checkpoint import folders, fsdp_files, integrity
from pipeline.train.engine.checkpoint import manager as checkpoint_manager
from pipeline.train.engine.checkpoint import parts as checkpoint_parts

SPECIFIES = (
    "pipeline.train.engine.checkpoint.folders",
    "pipeline.train.engine.checkpoint.fsdp_files",
    "pipeline.train.engine.checkpoint.integrity",
    "pipeline.train.engine.checkpoint.manager",
    "pipeline.train.engine.checkpoint.parts",
)

ALONE = Collective(0, 1)  # one process: every collective is a plain call


def save_like_a_run(out: Path, step: int) -> Path:
    """A checkpoint of the parts a DDP run saves (JSON per rank and shared, safetensors, an FSDP-style folder)."""

    def put(_state):
        return None

    parts = {
        "scheduler": checkpoint_parts.JsonPart("scheduler.json", lambda: {"last_epoch": step}, put, 0),
        "data": checkpoint_parts.JsonPart("data_state_rank{rank}.json", lambda: {"loader": {"made": step}}, put, 0),
        "rng": checkpoint_parts.RngPart(0),
    }

    class Weights:
        def save(self, folder: Path) -> None:
            from safetensors.torch import save_file

            save_file({"w": torch.full((4,), float(step))}, str(folder / "trainable.safetensors"))
            (folder / "fsdp").mkdir()
            save_file({"x": torch.ones(2)}, str(folder / "fsdp" / "rank0.safetensors"))

        def load(self, folder: Path) -> None:
            return None

    parts["weights"] = Weights()
    manager = checkpoint_manager.CheckpointManager(out, ALONE, mode={"world_size": 1})
    manager.register(parts)
    return manager.save(step)


def test_the_marker_records_every_file_with_its_size_and_sha256(tmp_path):
    folder = save_like_a_run(tmp_path, 3)
    files = folders.read_marker(folder)["files"]
    assert set(files) == {
        "scheduler.json",
        "data_state_rank0.json",
        "rng_rank0.safetensors",
        "trainable.safetensors",
        "fsdp/rank0.safetensors",
    }
    for name, record in files.items():
        assert record == integrity.file_record(folder / name)
    assert not list(folder.glob(".files-rank*")), "the per-rank lists are merged into the marker"
    assert integrity.check_files(folder) is None


DAMAGES = {
    "pickle": lambda path, marker: path.write_bytes(pickle.dumps(PickleBomb(marker))),
    "truncated": lambda path, marker: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "deleted": lambda path, marker: path.unlink(),
    "flipped": lambda path, marker: path.write_bytes(bytes([path.read_bytes()[0] ^ 1]) + path.read_bytes()[1:]),
}
FILES = [
    "scheduler.json",
    "data_state_rank0.json",
    "rng_rank0.safetensors",
    "trainable.safetensors",
    "fsdp/rank0.safetensors",
]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_is_named_latest_passes_over_it_and_nothing_is_unpickled(tmp_path, caplog, damage, name):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    save_like_a_run(out, 3)
    save_like_a_run(out, 6)
    DAMAGES[damage](out / "checkpoint-6" / name, marker)

    with pytest.raises(integrity.CheckpointDamaged) as named:
        integrity.choose_intact(out, "checkpoint-6", ALONE)
    message = str(named.value)
    assert "\n" not in message and name in message and "checkpoint-6" in message
    assert str(out / "checkpoint-3") in message, "names the newest intact older checkpoint to pass instead"

    with caplog.at_level(logging.WARNING):
        assert integrity.choose_intact(out, "latest", ALONE) == out / "checkpoint-3"
    assert "checkpoint-6 is damaged" in caplog.text and name in caplog.text
    assert not (out / "checkpoint-6").exists(), "set aside with the abandoned run, never taken as latest again"
    assert not marker.exists(), "a file of a checkpoint was unpickled"


def test_an_added_file_and_a_damaged_marker_are_named_too(tmp_path):
    out = tmp_path / "run"
    save_like_a_run(out, 3)
    save_like_a_run(out, 6)
    (out / "checkpoint-6" / "fsdp" / ".metadata").write_bytes(pickle.dumps(PickleBomb(tmp_path / "pwned")))
    with pytest.raises(integrity.CheckpointDamaged, match=r"fsdp/\.metadata, a file it was not saved with"):
        integrity.choose_intact(out, str(out / "checkpoint-6"), ALONE)
    marker = out / "checkpoint-6" / folders.MARKER
    marker.write_text(marker.read_text()[:20])
    assert integrity.choose_intact(out, "latest", ALONE) == out / "checkpoint-3"
    (out / "checkpoint-3" / "scheduler.json").unlink()
    with pytest.raises(integrity.CheckpointDamaged, match="every checkpoint .* is damaged"):
        integrity.choose_intact(out, "latest", ALONE)
    assert not (tmp_path / "pwned").exists()


def test_a_torch_distributed_checkpoint_is_refused_without_reading_its_pickle(tmp_path):
    """The FSDP state of an older version (DCP, whose .metadata is a pickle): refused with a message, never read."""
    folder = tmp_path / "fsdp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(PickleBomb(tmp_path / "pwned")))
    (folder / "__0_0.distcp").write_bytes(b"\0" * 64)
    with pytest.raises(fsdp_files.CheckpointFormatError, match="torch.distributed.checkpoint"):
        fsdp_files.ShardFiles(folder)
    assert not (tmp_path / "pwned").exists()


def test_shard_rows_are_fsdp2s_chunks():
    """The rows a rank holds are torch.chunk's (FSDP2 Shard(0)); the rows of any new world size are read back."""
    for rows in (0, 1, 5, 8, 13):
        for world in (1, 2, 3, 8):
            chunks = torch.arange(rows).chunk(world) if rows else []
            expected = [(int(c[0]), len(c)) for c in chunks] + [(rows, 0)] * (world - len(chunks))
            got = [fsdp_files._shard_rows(rows, r, world) for r in range(world)]
            assert [g for g in got if g[1]] == [e for e in expected if e[1]]
            assert sum(count for _, count in got) == rows


def test_a_checkpoint_folder_without_its_marker_is_removed_at_start(tmp_path, caplog):
    """A kill during pruning (the marker goes first) leaves a full folder nothing would ever remove or count."""
    out = tmp_path / "run"
    for step in (2, 4):
        save_like_a_run(out, step)
    (out / "checkpoint-2" / folders.MARKER).unlink()
    with caplog.at_level(logging.INFO):
        assert integrity.choose_intact(out, "latest", ALONE) == out / "checkpoint-4"
    assert not (out / "checkpoint-2").exists() and "checkpoint-2" in caplog.text
    assert json.loads((out / "checkpoint-4" / folders.MARKER).read_text())["step"] == 4


def fake_save(out, step, limit=None, marker=None, owns=lambda marker: True):
    def write(folder):
        (folder / "weights.txt").write_text(str(step))

    return checkpoint_manager.save_checkpoint(out, step, ALONE, write, marker or {}, limit, owns)


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / folders.MARKER).write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint-6").mkdir()  # crashed before the marker
    (tmp_path / ".checkpoint-8.incomplete").mkdir()
    assert folders.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-4"
    with pytest.raises(UserError):
        folders.resolve_resume(tmp_path, str(tmp_path / "checkpoint-6"))
    folders.prune(tmp_path, 1)
    assert [p.name for _, p in folders.complete_checkpoints(tmp_path)] == ["checkpoint-4"]


def test_resuming_earlier_then_saving_keeps_the_new_timeline(tmp_path):
    for step in (2, 4, 6):
        fake_save(tmp_path, step)
    resume = integrity.choose_intact(tmp_path, str(tmp_path / "checkpoint-2"), ALONE)
    assert resume == tmp_path / "checkpoint-2"
    assert sorted(p.name.split("-", 3)[-1] for p in tmp_path.glob("abandoned-*")) == ["checkpoint-4", "checkpoint-6"]
    fake_save(tmp_path, 3, limit=2)
    assert [p.name for _, p in folders.complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert folders.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-3"
    assert not list(tmp_path.glob("abandoned-*")), "the abandoned timeline counts as older than any live checkpoint"


def test_stale_staging_folders_are_removed_and_latest_without_checkpoints_is_none(tmp_path, caplog):
    (tmp_path / ".checkpoint-8.incomplete").mkdir()
    with caplog.at_level("INFO"):
        assert integrity.choose_intact(tmp_path, "latest", ALONE) is None
    assert "no complete checkpoint" in caplog.text
    assert not (tmp_path / ".checkpoint-8.incomplete").exists()


def test_pruning_never_leaves_a_marker_on_a_partial_folder(tmp_path, monkeypatch):
    import shutil

    for step in (1, 2):
        fake_save(tmp_path, step)
    monkeypatch.setattr(shutil, "rmtree", lambda path, ignore_errors=False: None)  # a removal that gets nowhere
    folders.prune(tmp_path, 1)
    assert not (tmp_path / "checkpoint-1" / folders.MARKER).exists()
    assert folders.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"


def test_resume_from_a_checkpoint_name_inside_output_dir(tmp_path):
    fake_save(tmp_path, 500)
    assert folders.resolve_resume(tmp_path, "checkpoint-500") == tmp_path / "checkpoint-500"
    with pytest.raises(UserError, match="checkpoint-400"):
        folders.resolve_resume(tmp_path, "checkpoint-400")


@pytest.mark.parametrize("marker", ["[1, 2]", "5", '{"step": "6"}', '{"step": 6, "files": {"a": 5}}', '{"step": 6'])
def test_latest_passes_over_any_marker_that_does_not_validate(tmp_path, caplog, marker):
    """JSON that is not an object (or whose records are not objects) is damage like a truncated marker."""
    save_like_a_run(tmp_path, 3)
    save_like_a_run(tmp_path, 6)
    (tmp_path / "checkpoint-6" / folders.MARKER).write_text(marker)
    with caplog.at_level(logging.WARNING):
        assert integrity.choose_intact(tmp_path, "latest", ALONE) == tmp_path / "checkpoint-3"
    assert "checkpoint.json cannot be read" in caplog.text and "checkpoint.json checkpoint.json" not in caplog.text
    assert list(tmp_path.glob("damaged-*-checkpoint-6")), "set aside as damaged, not as an abandoned run"
    assert "abandoned" not in caplog.text


def test_a_named_checkpoint_with_a_truncated_marker_is_one_line_naming_the_intact_older_one(tmp_path):
    save_like_a_run(tmp_path, 3)
    save_like_a_run(tmp_path, 6)
    marker = tmp_path / "checkpoint-6" / folders.MARKER
    marker.write_text(marker.read_text()[:50])
    with pytest.raises(integrity.CheckpointDamaged) as refused:
        integrity.choose_intact(tmp_path, "checkpoint-6", ALONE)
    message = str(refused.value)
    assert "\n" not in message and "checkpoint-6" in message and folders.MARKER in message
    assert f"--resume_from_checkpoint {tmp_path / 'checkpoint-3'}" in message


def test_no_checkpoint_is_written_from_non_finite_state_and_latest_stays_the_last_finite(tmp_path):
    from pipeline.train.engine.model import first_nonfinite

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    part = checkpoint_parts.JsonPart("state.json", lambda: {"w": model.weight.tolist()}, lambda s: None, 0)
    manager = checkpoint_manager.CheckpointManager(tmp_path, ALONE)
    manager.register({"weights": part}, finite=lambda: first_nonfinite(model, optimizer))
    manager.save(1)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(checkpoint_manager.NonFiniteState, match="step 2: the trainable weight weight is not finite"):
        manager.save(2)
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    optimizer.state[model.bias]["exp_avg_sq"][0] = float("inf")
    with pytest.raises(checkpoint_manager.NonFiniteState, match="the optimizer's exp_avg_sq"):
        manager.save(3)
    assert [s for s, _ in folders.complete_checkpoints(tmp_path)] == [1] and not list(tmp_path.glob(".checkpoint-*"))
    assert integrity.choose_intact(tmp_path, "latest", ALONE) == tmp_path / "checkpoint-1"


def test_the_cadence_saves_every_n_steps_and_at_the_end():
    manager = checkpoint_manager.CheckpointManager(".", ALONE, every=3)
    assert [s for s in range(1, 11) if manager.due(s, 10)] == [3, 6, 9, 10]
