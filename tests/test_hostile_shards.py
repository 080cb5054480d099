"""Shards built to hurt the tools: symlinks, hardlinks, names that leave the folder, lone members, a cut-short
``.npy``, a truncated tar. verify names each; reshard records each in ``_failures/`` and copies the rest;
preview reports them; nothing is written outside the output."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from helpers import synthetic_task

from pipeline.shards.format import unsafe_name
from pipeline.shards.reader import iter_checked
from shards_tools.convert import reshard
from shards_tools.sheet import preview
from shards_tools.verify import verify


def rewrite(path: Path, mutate) -> None:
    """Rewrite a tar through ``mutate([(TarInfo, bytes)]) -> [(TarInfo, bytes)]``."""
    with tarfile.open(path) as tin:
        members = [(m, tin.extractfile(m).read()) for m in tin]
    with tarfile.open(path, "w") as tout:
        for info, data in mutate(members):
            if info.isreg():
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
            else:
                tout.addfile(info)


def link(kind: bytes, name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


@pytest.fixture
def hostile(tmp_path):
    """A task of 6 shards × 5 samples; every shard but the first is damaged in its own way.

    Returns (task folder, {problem: the sample key it hits}); the truncated last shard loses its last samples.
    """
    task = synthetic_task(tmp_path, "t", samples=30, per_shard=5)
    shards = sorted((task / "src1").glob("*.tar"))
    hits = {}

    def swap_member(key, ext, info_data):  # replace one member of ``key`` by ``info_data``
        def mutate(members):
            return [info_data if m.name == f"{key}.{ext}" else (m, d) for m, d in members]

        return mutate

    hits["symlink"] = "s-0000005"
    rewrite(
        shards[1],
        swap_member("s-0000005", "target.png", (link(tarfile.SYMTYPE, "s-0000005.target.png", "/etc/passwd"), b"")),
    )
    hits["hardlink"] = "s-0000011"
    rewrite(
        shards[2],
        swap_member(
            "s-0000011", "source0.png", (link(tarfile.LNKTYPE, "s-0000011.source0.png", "s-0000010.source0.png"), b"")
        ),
    )
    hits["escape"] = "../../../../tmp/escape"

    def escape(members):
        key = "s-0000016"
        return [
            (tarfile.TarInfo(m.name.replace(key, hits["escape"])), d) if m.name.startswith(key) else (m, d)
            for m, d in members
        ]

    rewrite(shards[3], escape)
    hits["lone image"] = "s-0000021"  # an image without its json

    def lone(members):
        return [(m, d) for m, d in members if m.name != "s-0000021.json"]

    rewrite(shards[4], lone)
    hits["short npy"] = "s-0000022"

    def short_npy(members):
        return [(m, d[:-6]) if m.name == "s-0000022.emb_en.npy" else (m, d) for m, d in members]

    rewrite(shards[4], short_npy)
    data = shards[5].read_bytes()
    shards[5].write_bytes(data[: len(data) // 2])  # truncated mid-shard
    return task, hits


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
    assert own["failed"] == len(failures) and own["ok"] == manifest["samples"]
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
    with pytest.raises(FileExistsError, match="max_samples_per_shard"):
        reshard(str(task), str(out), None, 3)


def test_preview_skips_and_reports_hostile_samples(hostile, tmp_path):
    task, hits = hostile
    count, problems = preview(str(task), str(tmp_path / "sheet.png"), 30, None)
    assert count >= 30 - 5 - 5 - 1 and (tmp_path / "sheet.png").exists()
    for what, key in hits.items():
        assert any(p["key"] == key for p in problems), what


@pytest.mark.slow
def test_the_clis_report_hostile_shards_and_exit_1_without_a_traceback(hostile, tmp_path):
    from helpers import no_traceback_of_ours, run_module

    task, hits = hostile
    shown = run_module("shards_tools", "preview", str(task), "--out", str(tmp_path / "sheet.png"), "--samples", "30")
    assert shown.returncode == 1 and no_traceback_of_ours(shown.stderr)
    assert all(key in shown.stdout for key in hits.values()) and (tmp_path / "sheet.png").exists()
    copied = run_module(
        "shards_tools", "reshard", str(task), "--output_dir", str(tmp_path / "r"), "--max_samples_per_shard", "4"
    )
    assert (
        copied.returncode == 1 and "above --max_failure_ratio" in copied.stderr and no_traceback_of_ours(copied.stderr)
    )
    checked = run_module("shards_tools", "verify", str(task))
    assert checked.returncode == 1 and hits["escape"] in checked.stdout


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
