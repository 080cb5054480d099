"""Shards built to hurt the tools: symlinks, hardlinks, names that leave the folder, lone members, a cut-short
``.npy``, a truncated tar. verify names each; reshard records each in ``_failures/`` and copies the rest;
preview reports them; nothing is written outside the output."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.shards.format import unsafe_name
from pipeline.shards.reader import iter_checked
from shards_tools.reshard import reshard
from shards_tools.sheet import preview
from shards_tools.verify import verify

SPECIFIES = (
    "pipeline.shards.format",
    "pipeline.shards.reader",
)


def test_the_checked_reader_reports_each_hostile_member(hostile):
    task, hits = hostile
    shards = sorted((task / "src1").glob("*.tar"))
    seen = {}
    for shard in shards:
        with open(shard, "rb") as handle:
            for item in iter_checked(handle):
                seen.setdefault(item.key, []).extend(item.problems)
    assert any("symlink" in p for p in seen[hits["symlink"]])
    assert any("hardlink" in p for p in seen[hits["hardlink"]])
    assert any("'..' component" in p for p in seen[hits["escape"]])
    assert any("unreadable from here on" in p for p in seen[None]), "the truncated shard"
    assert unsafe_name("a/../b") and unsafe_name("/abs") and not unsafe_name("dir/key.json")


def test_verify_names_every_hostile_sample(hostile):
    task, hits = hostile
    _, problems = verify(str(task), None)
    text = "\n".join(f"{p['shard']} [{p['key']}] {p['problem']}" for p in problems)
    for what, key in hits.items():
        assert any(p["key"] == key for p in problems), f"{what} ({key}) not reported:\n{text}"
    assert any(p["key"] is None and "unreadable" in p["problem"] for p in problems), text


def test_reshard_records_bad_samples_copies_the_rest_and_writes_nothing_outside(hostile, tmp_path):
    task, hits = hostile
    out = tmp_path / "out" / "t"
    manifest = reshard(str(task), str(out), None, 4)
    own = manifest["reshard"]
    failures = [json.loads(x) for f in (out / "_failures").glob("*.jsonl") for x in f.read_text().splitlines()]
    text = "\n".join(f"{f['kind']} {f['reason']}" for f in failures)
    for what, key in hits.items():
        assert any(key in f["reason"] and f["file"].endswith(".tar") for f in failures), f"{what}:\n{text}"
    assert any(f["kind"] == "unreadable_shard" for f in failures), text
    source = sum(e["samples"] for e in json.loads((task / "manifest.json").read_text())["shards"])
    assert own["ok"] == manifest["samples"]
    # the ratio counts samples: the truncated shard's failure costs every sample it still held
    assert own["failed"] == source - own["ok"] and own["failed"] > len(failures)
    assert manifest["samples"] >= 30 - 5 - 5 - 1  # the truncated shard loses at most its 5
    _, problems = verify(str(out), None)
    assert problems == [], problems
    for shard in out.rglob("*.tar"):
        with tarfile.open(shard) as tar:
            assert all(m.isreg() and not unsafe_name(m.name) for m in tar)
    assert not Path("/tmp/escape.json").exists() and not list(tmp_path.rglob("escape*"))


def test_reshard_reruns_resume_and_other_flags_are_refused(hostile, tmp_path):
    task, _ = hostile
    out = tmp_path / "out" / "t"
    first = reshard(str(task), str(out), None, 4)
    again = reshard(str(task), str(out), None, 4)
    assert again["samples"] == first["samples"] and again["shards"] == first["shards"], "a rerun adds nothing"
    assert again["reshard"] == first["reshard"]
    with pytest.raises(UserError, match="max_samples_per_shard"):
        reshard(str(task), str(out), None, 3)


def test_preview_skips_and_reports_hostile_samples(hostile, tmp_path):
    task, hits = hostile
    count, problems = preview(str(task), str(tmp_path / "sheet.png"), 30, None)
    assert count >= 30 - 5 - 5 - 1 and (tmp_path / "sheet.png").exists()
    for what, key in hits.items():
        assert any(p["key"] == key for p in problems), what


def test_no_writer_puts_a_name_that_leaves_the_folder_into_a_shard(tmp_path):
    """The last guard under reshard and convert-legacy: the tar writer itself refuses such keys."""
    from pipeline.shards.format import TarShardWriter

    writer = TarShardWriter(str(tmp_path / "x.tar"))
    for key in ("../../etc/x", "/abs/key", "a/../../b"):
        with pytest.raises(ValueError, match="refusing to write"):
            writer.add(key, {"json": b"{}"})
    writer.add("fine-000000001", {"json": b"{}"})
    writer.close()
    with tarfile.open(tmp_path / "x.tar") as tar:
        assert tar.getnames() == ["fine-000000001.json"]


def test_a_second_writer_of_a_task_directory_is_refused_before_it_removes_anything(hostile, tmp_path):
    """reshard (and convert-legacy, through the same TaskWriter) take the lease extraction takes: a second run on
    an output a live run writes used to be accepted and removed the live run's uncommitted shards as orphans."""
    from pipeline.shards import commits
    from pipeline.shards.lease import LeaseHeld, RankLease
    from pipeline.shards.storage import Store

    task, _ = hostile
    out = tmp_path / "out" / "t"
    reshard(str(task), str(out), None, 4)
    in_flight = out / "src1" / "00000-000099.tar"  # a live run's published, not yet committed shard
    in_flight.write_bytes(b"x" * 1024)
    live = RankLease(Store(str(out)), 0, path=commits.lease_file(0))
    try:
        with pytest.raises(LeaseHeld, match="another run"):
            reshard(str(task), str(out), None, 4)
        assert in_flight.exists(), "the refused run removed the live run's shard"
    finally:
        live.release()
    reshard(str(task), str(out), None, 4)  # the lease is free again: the rerun resumes and cleans up
    assert not in_flight.exists()
