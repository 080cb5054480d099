"""Faults and hostile input in extraction and the shard tools: no hang, no poison line (issue 12)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline.common.records import RecordError, parse_line
from pipeline.shards.commits import ProgressLog
from pipeline.shards.storage import Store
from pipeline.shards.writer import Failure, PreparedSample, ShardSink

SPECIFIES = (
    "pipeline.shards.commits",
    "pipeline.shards.storage",
    "pipeline.shards.writer",
)


def _sample(line: int) -> PreparedSample:
    meta = {"key": f"k{line}", "line": line, "num_sources": 0, "variants": {}}
    return PreparedSample(f"k{line}", line, 0, meta, {"target": ("png", b"\x89PNG fake")})


@pytest.mark.parametrize(
    "text, field, words",
    [
        ("[" * 100_000 + "]" * 100_000, None, "nested too deeply"),
        ('{"target_image": "t.png", "instruction": "\\ud800 broken"}', "instruction", "lone surrogate"),
        ('{"target_image": "t\\udfff.png"}', "target_image", "lone surrogate"),
        ('{"target_image": "t.png", "meta": {"k": ["\\ud83d"]}}', "meta.k[0]", "lone surrogate"),
        ('{"target_image": "t.png", "x": ' + "[" * 70 + "]" * 70 + "}", "x" + "[0]" * 64, "nested deeper"),
        ('{"target_image": "t.png", "instruction": "caf\udce9"}', None, "invalid UTF-8 (byte 0xe9 at column 46)"),
    ],
)
def test_poison_lines_are_record_errors(text, field, words):
    with pytest.raises(RecordError) as info:
        parse_line(text, "in.jsonl", 7)
    assert info.value.line == 7 and info.value.field == field and words in info.value.reason
    json.dumps(Failure("in.jsonl", 7, "invalid_row", info.value.reason, field, text).to_json()).encode("utf-8")


def test_non_finite_embeddings_fail_their_sample_at_write_time():
    from pipeline.shards.commits import read_commits

    store = Store(f"memory://nonfinite-{id(object())}/task")
    sink = ShardSink(store, ProgressLog(store, 0, []), 0, max_samples_per_shard=1000, max_shard_bytes=1 << 30)
    overflow = torch.full((3, 8), 60000.0, dtype=torch.float16) * 2  # fp16 overflow -> inf
    sink.add_sample(_sample(0), {"en": torch.zeros(3, 8), "cn": overflow})
    sink.add_sample(_sample(1), {"en": torch.tensor([[float("nan")] * 8])})
    sink.add_sample(_sample(2), {"en": torch.ones(3, 8)})
    sink.close()
    commits = read_commits(store)
    assert [n for c in commits for n in c.lines] == [2]
    failures = {f["line"]: f for c in commits for f in c.failures}
    assert {line: f["kind"] for line, f in failures.items()} == {0: "non_finite_embedding", 1: "non_finite_embedding"}
    assert failures[0]["field"] == "cn" and "24 non-finite value(s) of 24" in failures[0]["reason"]


def test_a_broken_manifest_names_its_file_and_unlisted_tasks_are_not_opened(tmp_path):
    from pipeline.shards.tasks import DataConfigError
    from pipeline.train.config.data import DataConfig
    from pipeline.train.stream.startup import load_tasks

    good = {"shards": [{"url": "src1/00000-000000.tar", "num_sources": 1, "samples": 3}], "null_embedding": None}
    for name, body in {
        "good": json.dumps(good),
        "truncated": json.dumps(good)[:40],
        "no_shards": json.dumps({"task": "no_shards"}),
        "bad_entry": json.dumps({"shards": [{"url": "x.tar"}]}),
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(body)
    tasks = load_tasks(DataConfig(meta_dir=str(tmp_path), task_weights={"good": 1.0}), None)
    assert list(tasks) == ["good"] and tasks["good"].shards[1][0].samples == 3
    for name, words in {
        "truncated": "not valid JSON",
        "no_shards": "has no 'shards' list",
        "bad_entry": "shards[0] lacks num_sources, samples",
    }.items():
        with pytest.raises(DataConfigError, match=str(tmp_path / name / "manifest.json")) as info:
            load_tasks(DataConfig(meta_dir=str(tmp_path), task_weights={"good": 1.0, name: 0.5}), None)
        assert words in str(info.value)
    with pytest.raises(DataConfigError, match=r"unknown task\(s\) \['nope'\]; available tasks: \['bad_entry'"):
        load_tasks(DataConfig(meta_dir=str(tmp_path), task_weights={"nope": 1.0}), None)


def test_shards_and_their_folder_are_fsynced_before_the_commit(tmp_path, monkeypatch):

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    spool = tmp_path / "spool.tar"
    spool.write_bytes(b"tar bytes")
    store = Store(str(tmp_path / "task"))
    store.put_file(str(spool), "src1/00000-000000.tar")
    published = str(tmp_path / "task" / "src1")
    assert any(p.startswith(published + "/00000-000000.tar.tmp-") for p in synced), synced  # data before rename
    assert published in synced  # the rename itself
    store.write_bytes("_progress/rank-00000/000000.json", b"{}")
    assert str(tmp_path / "task" / "_progress" / "rank-00000") in synced


def test_transient_failures_are_retried_and_superseded():
    from pipeline.shards.commits import Commit, done_lines, standing_failures, summarize

    def failure(line, kind):
        return {"file": "in.jsonl", "line": line, "kind": kind, "reason": "r", "field": None, "text": ""}

    first = [  # a first run: line 1 could not be fetched, line 2 is not an image, line 3 ran out of memory
        Commit(0, 0, {"url": "src1/a.tar"}, [0], [failure(1, "fetch_error"), failure(2, "not_an_image")]),
        Commit(1, 0, None, [], [failure(3, "encode_error")]),
    ]
    assert done_lines(first).tolist() == [True, False, True]  # 1 and 3 are tried again
    assert summarize(first)["failed_by_reason"] == {"encode_error": 1, "fetch_error": 1, "not_an_image": 1}
    rerun = first + [Commit(0, 1, {"url": "src1/b.tar"}, [1], [failure(3, "encode_error")])]  # one rank now
    assert sorted(f["line"] for _, f in standing_failures(rerun)) == [2, 3]
    assert summarize(rerun) == {"ok": 2, "failed": 2, "failed_by_reason": {"encode_error": 1, "not_an_image": 1}}
    per_file = [Commit(0, 0, None, [], [failure(5, "bad_embedding")]), Commit(1, 0, {"url": "x"}, [5], [])]
    assert len(standing_failures(per_file, by_rank=True)) == 1  # conversion: line 5 of another file


def test_failures_files_are_rebuilt_from_the_commit_records(tmp_path):
    """A kill between a commit record and the failures file, then a rerun with fewer ranks: nothing lost."""
    from pipeline.shards.commits import read_commits, write_failures_files

    store = Store(str(tmp_path / "task"))
    for rank in (0, 1):
        sink = ShardSink(store, ProgressLog(store, rank, []), rank, 1000, 1 << 30)
        sink.add_sample(_sample(2 * rank), {"en": torch.ones(2, 4)})
        sink.add_failure(Failure("in.jsonl", 2 * rank + 1, "not_an_image", "bytes are text"))
        sink.close()
    assert not (tmp_path / "task" / "_failures").exists()  # the records hold them until the final step
    write_failures_files(store, read_commits(store))
    files = sorted((tmp_path / "task" / "_failures").iterdir())
    assert [f.name for f in files] == ["rank-0.jsonl", "rank-1.jsonl"]
    assert [json.loads(f.read_text())["line"] for f in files] == [1, 3]

    # (the same command resumes: the SIGKILL tests rerun with the first run's input and flags)
