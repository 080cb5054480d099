"""pipeline/demo.py: its options are declared fields; a typo'd number is one line and exit 2, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import demo


def test_a_demo_too_short_to_checkpoint_and_resume_is_refused_before_anything_is_written(tmp_path, capsys):
    assert demo.main(["--work_dir", str(tmp_path / "w"), "--steps", "1"]) == 2
    assert "--steps must be a number >= 2, got 1" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--family", "nope"])
    assert exit_.value.code == 2


def test_both_halves_of_the_demos_training_save_at_half_and_render_at_the_end():
    flags = demo.training_flags(Path("m"), Path("s"), Path("r"), Path("v.jsonl"), 3, 6, demo.families.get(None))

    def value(flag: str) -> str:
        return flags[flags.index(flag) + 1]

    assert value("--checkpointing_steps") == "3" and value("--validation_steps") == "6"
    assert value("--output_dir") == "r" and "--max_train_steps" not in flags  # each half adds its own
