"""pipeline/files.py: the atomic write both halves use, and the JSON files written through it."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.files import atomic_write, read_json_object, write_json_file


def test_an_atomic_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_a_write_that_fails_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    """A failure while the temporary is written (here: bytes the OS refuses, a str) leaves the old file as it was."""
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_json_files_round_trip_and_a_file_of_another_shape_is_a_value_error(tmp_path):
    write_json_file(tmp_path / "a.json", {"step": 3, "files": {}})
    assert read_json_object(tmp_path / "a.json") == {"step": 3, "files": {}}
    (tmp_path / "b.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object, found list"):
        read_json_object(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("{torn")
    with pytest.raises(ValueError):
        read_json_object(tmp_path / "c.json")
