"""Training data stream: mixing, batches, never starving, exact resume, safety, sources."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest

from pipeline.shards.tasks import DataConfigError, Task
from pipeline.train.config.data import StreamConfig, parse_weights
from pipeline.train.stream import dataset as stream_mod
from pipeline.train.stream.decide import choose_variant
from pipeline.train.stream.errors import UnusableData
from pipeline.train.stream.mix import draw_num_sources, draw_task, plan_mix

SPECIFIES = (
    "pipeline.shards.tasks",
    "pipeline.train.stream.decide",
    "pipeline.train.stream.loader",
    "pipeline.train.stream.startup",
    "pipeline.train.stream.errors",
    "pipeline.train.stream.mix",
)

# --- weights and mixing ----------------------------------------------------------------------


def test_parse_weights_errors():
    assert parse_weights("a=0.5, b=1.2", "--w") == {"a": 0.5, "b": 1.2}
    for bad, message in [
        ("a", "NAME=WEIGHT"),
        ("a=x", "not a number"),
        ("a=-1", ">= 0"),
        ("a=1,a=2", "twice"),
        ("", "no weights"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_weights(bad, "--w")


def _task(name: str, ns: list[int]) -> Task:
    from pipeline.shards.tasks import Shard

    return Task(name, {n: [Shard(f"/x/{name}/src{n}/0.tar", n, 1, "/x/i.json")] for n in ns})


def test_plan_mix_errors_and_renormalisation(caplog):
    tasks = {"a": _task("a", [1, 2]), "b": _task("b", [1])}
    with pytest.raises(DataConfigError, match=r"unknown task\(s\) \['zzz'\]; available tasks: \['a', 'b'\]"):
        plan_mix(tasks, {"a": 1, "zzz": 1}, {"1": 1})
    with caplog.at_level(logging.WARNING):
        plan = plan_mix(tasks, {"a": 1, "b": 3}, {"0": 2, "1": 1, "2": 1, "3": 0})
    assert "source count 0 has weight 2" in caplog.text
    assert plan.n_probs == {1: 0.5, 2: 0.5}
    assert plan.task_probs[1] == {"a": 0.25, "b": 0.75} and plan.task_probs[2] == {"a": 1.0}
    with pytest.raises(DataConfigError, match="nothing to train on"):
        plan_mix(tasks, {"b": 1}, {"0": 1, "2": 1})


def test_empirical_mix_matches_weights_over_20k_steps():
    tasks = {"a": _task("a", [0, 1, 2]), "b": _task("b", [1, 2]), "c": _task("c", [2, 3])}
    plan = plan_mix(tasks, {"a": 0.5, "b": 1.2, "c": 1.0}, {"0": 1, "1": 2, "2": 1, "3": 0.5})
    steps = 20_000
    ns = [draw_num_sources(7, s, plan.n_probs) for s in range(steps)]
    for n, p in plan.n_probs.items():
        assert abs(ns.count(n) / steps - p) < 0.02, (n, ns.count(n) / steps, p)
    for rank in (0, 1):
        picks: dict[int, Counter] = {}
        for s, n in enumerate(ns):
            picks.setdefault(n, Counter())[draw_task(7, rank, s, plan.task_probs[n])] += 1
        for n, counter in picks.items():
            total = sum(counter.values())
            for task, p in plan.task_probs[n].items():
                assert abs(counter[task] / total - p) < 0.02, (rank, n, task)
    # N depends on the step only; the task differs between ranks
    assert [draw_task(7, 0, s, plan.task_probs[2]) for s in range(200)] != [
        draw_task(7, 1, s, plan.task_probs[2]) for s in range(200)
    ]


# --- batches -----------------------------------------------------------------------------------


def test_choose_variant_rules():
    meta = {
        "num_sources": 1,
        "instruction": "a",
        "instruction_cn": "",
        "inverse_instruction": "b",
        "inverse_instruction_cn": "c",
        "variants": {"en": 1, "drop": 1, "en_inv": 1, "cn_inv": 1, "drop_inv": 1},
    }
    seen = Counter(choose_variant(meta, np.random.default_rng(i), True, 0.0)[0] for i in range(3000))
    assert set(seen) == {"en", "en_inv", "cn_inv"} and all(abs(c / 3000 - 1 / 3) < 0.04 for c in seen.values())
    assert {choose_variant(meta, np.random.default_rng(i), False, 0.0)[0] for i in range(50)} == {"en"}
    dropped = Counter(choose_variant(meta, np.random.default_rng(i), True, 1.0)[:2] for i in range(300))
    assert set(dropped) == {("drop", ""), ("drop_inv", "")}
    variant, text, inverse = choose_variant({**meta, "instruction": ""}, np.random.default_rng(3), True, 0.0)
    assert inverse == variant.endswith("_inv")
    t2i = {"num_sources": 0, "instruction": "", "instruction_cn": "", "variants": {}}
    assert choose_variant(t2i, np.random.default_rng(0), True, 0.0) == ("null", "", False)


# --- running the real loader -------------------------------------------------------------------


# --- safety and sources ------------------------------------------------------------------------


def test_stream_module_documents_why_it_exists():
    assert "webdataset cannot do" in stream_mod.__doc__


# --- what the tasks' embeddings were made with (issue 13, item 5) ---------------------------------


def _made_with(name: str, style: str, digest: str | None, hidden: int = 64, ns=(1,), null: bool = False) -> Task:
    from pipeline.shards.tasks import Shard

    manifest = {"prompt_style": style, "model": {"config_sha256": digest, "hidden_size": hidden}}
    shards = {n: [Shard(f"/x/{name}/src{n}/0.tar", n, 12, f"/x/{name}/src{n}/0.index.json")] for n in ns}
    return Task(name, shards, f"/x/{name}/null_embedding.npy" if null else None, manifest, f"/x/{name}")


def _build(tasks, allow_mixed=False, weights="0=1,1=1,2=1,3=1", text_drop_ratio=0.05, task_weights=None):
    from pipeline.train.config.data import DataConfig
    from pipeline.train.stream.startup import mix_tasks

    config = DataConfig(
        task_weights=task_weights,
        source_count_weights=parse_weights(weights, "w"),
        allow_mixed_conditioning=allow_mixed,
    )
    return mix_tasks(tasks, config, StreamConfig(batch_size=1, text_drop_ratio=text_drop_ratio))


def test_tasks_made_differently_are_refused_unless_allowed(caplog):
    from pipeline.train.stream.startup import describe_tasks

    same = {"a": _made_with("a", "diffusers", "d1"), "b": _made_with("b", "diffusers", "d1", ns=(2,))}
    _build(same)
    styles = {"a": _made_with("a", "diffusers", "d1"), "b": _made_with("b", "firered", None)}
    with pytest.raises(DataConfigError, match=r"prompt style .*diffusers: a; firered: b.*--allow_mixed_conditioning"):
        _build(styles)
    encoders = {"a": _made_with("a", "diffusers", "d1"), "b": _made_with("b", "diffusers", "d2")}
    with pytest.raises(DataConfigError, match="differ in encoder"):
        _build(encoders)
    with caplog.at_level(logging.WARNING):
        _build(encoders, allow_mixed=True)
    assert "--allow_mixed_conditioning" in caplog.text
    hidden = {"a": _made_with("a", "diffusers", "d1"), "b": _made_with("b", "diffusers", "d1", hidden=32)}
    with pytest.raises(DataConfigError, match="different hidden sizes"):
        _build(hidden, allow_mixed=True)
    # a task never drawn (its only source count has weight 0, or it is not in the weights) does not count
    _build({"a": _made_with("a", "diffusers", "d1"), "b": _made_with("b", "firered", None, ns=(2,))}, weights="1=1,2=0")
    _build(styles, task_weights={"a": 1.0})
    table = describe_tasks(styles, {"a": 1.0, "b": 0.5})
    assert table[0].split() == ["task", "weight", "style", "encoder", "hidden", "samples", "N=0/1/2/3", "null"]
    assert table[2].split() == ["b", "0.5", "firered", "?", "64", "-/12/-/-", "no"]


def test_t2i_task_without_null_embedding_is_refused_at_start_up():
    t2i = {"t": _made_with("t", "diffusers", "d1", ns=(0,))}
    with pytest.raises(DataConfigError, match=r"task\(s\) t have text-to-image samples but no null_embedding.npy"):
        _build(t2i)
    _build(t2i, text_drop_ratio=0.0)
    _build({"t": _made_with("t", "diffusers", "d1", ns=(0,), null=True)})


def test_the_stream_has_one_error_handler_for_every_kind_of_failure():
    """ErrorHandler: a missing or forbidden shard stops the run; bad samples are skipped and counted in one counter;
    reads failing a whole indexed pass in a row stop it; so do --max_bad_in_a_row unusable samples in a row; and it
    is the reader's retry policy (a transient error retried with backoff, a permanent one given up at once)."""
    from pipeline.train.stream.errors import ASSEMBLE, ITEM, READ, ErrorHandler, NoUsableSample, UnusableData

    handler = ErrorHandler(limit=5)
    handler.register("t|1", "t", 1, shards=2, samples=3)
    for fatal in (FileNotFoundError("gone.tar"), PermissionError("no"), NoUsableSample("empty")):
        with pytest.raises(UnusableData, match="task t"):
            handler.handle("t|1", READ, fatal)
    handler.handle("t|1", READ, OSError("short read"))
    handler.handle("t|1", READ, OSError("short read"))
    handler.passed("t|1", READ)  # a good read ends the run of failures
    handler.handle("t|1", READ, OSError("short read"))
    handler.handle("t|1", READ, OSError("short read"))
    with pytest.raises(UnusableData, match="3 unreadable samples in a row, the last: OSError: short read"):
        handler.handle("t|1", READ, OSError("short read"))
    handler.handle("t|1", ITEM, "a truncated member")
    for _ in range(5):
        handler.handle("t|1", ASSEMBLE, ValueError("bad png"), "k")
    with pytest.raises(UnusableData, match="6 samples in a row could not be used"):
        handler.handle("t|1", ASSEMBLE, ValueError("bad png"), "k")
    assert handler.streams["t|1"].skipped == 5 + 1 + 6  # reads skipped, the corrupt item, the unusable: one count
    handler.passed("t|1", ASSEMBLE)
    handler.handle("t|1", ASSEMBLE, ValueError("bad png"), "k")  # a batch assembled in between: counting restarts

    assert handler.retry_after("s3://b/x.tar", ConnectionResetError("reset"), 0) is not None
    assert handler.retry_after("s3://b/x.tar", ConnectionResetError("reset"), handler.retries - 1) is None
    assert handler.retry_after("s3://b/x.tar", FileNotFoundError("gone"), 0) is None


def test_a_prompt_the_transformer_cannot_position_costs_a_sample_not_the_run(tmp_path, caplog):
    """A ~9,200-token instruction written by another tool used to stop every run that drew it (the transformer's
    text positions); the stream now skips and counts it like a corrupt sample."""
    from helpers import synthetic_task

    from pipeline.families.qwen_edit.forward import ROPE_POSITIONS, text_positions
    from pipeline.shards.tasks import discover_tasks
    from pipeline.train.config.data import StreamConfig
    from pipeline.train.stream.dataset import MixedBatchDataset
    from pipeline.train.stream.mix import plan_mix

    assert text_positions([(1024, 1024)]) == ROPE_POSITIONS - 32  # diffusers: text starts after max(h, w) // 2
    synthetic_task(tmp_path, "t", samples=12, per_shard=6, tokens_of=lambda i: 9201 if i == 5 else 4)
    tasks = discover_tasks(str(tmp_path), None)
    config = StreamConfig(batch_size=2, seed=1, image_sample_size=16, text_drop_ratio=0.0, readahead_bytes=0)
    stream = iter(MixedBatchDataset(tasks, plan_mix(tasks, {"t": 1}, {"1": 1}), 0, 1, config))
    with caplog.at_level("WARNING"):
        keys = [key for _ in range(12) for key in next(stream)["keys"]]
    assert "s-0000005" not in keys and len(keys) == 24
    assert "PromptTooLong" in caplog.text and "9201 tokens" in caplog.text


def test_an_embedding_of_another_width_or_with_nan_costs_its_sample_named_before_assembly(tmp_path, caplog):
    """A sample grafted from a task made with another encoder reached the transformer (RuntimeError, exit 1, again
    after every resume); a NaN embedding cost the whole step. Both are now skipped where the embedding is read."""
    import torch
    from helpers import synthetic_task

    from pipeline.shards.tasks import discover_tasks
    from pipeline.train.config.data import StreamConfig
    from pipeline.train.stream.dataset import MixedBatchDataset
    from pipeline.train.stream.mix import plan_mix

    bad = {5: torch.ones(4, 16), 7: torch.full((4, 8), float("nan")), 9: torch.full((4, 8), float("inf"))}
    synthetic_task(tmp_path, "t", samples=12, per_shard=6, embedding_of=bad.get)
    tasks = discover_tasks(str(tmp_path), None)
    config = StreamConfig(batch_size=2, seed=1, image_sample_size=16, text_drop_ratio=0.0, readahead_bytes=0)
    stream = iter(MixedBatchDataset(tasks, plan_mix(tasks, {"t": 1}, {"1": 1}), 0, 1, config))
    with caplog.at_level("WARNING"):
        batches = [next(stream) for _ in range(12)]
    keys = [key for batch in batches for key in batch["keys"]]
    assert not {"s-0000005", "s-0000007", "s-0000009"} & set(keys) and len(keys) == 24
    assert all(bool(torch.isfinite(b["prompt_embeds"].float()).all()) and b["prompt_embeds"].shape[2] == 8
               for b in batches)  # fmt: skip
    assert "task t sample s-0000005 embedding en: width 16, the task's embeddings are 8 wide" in caplog.text
    assert "task t sample s-0000007 embedding en: holds NaN/Inf values" in caplog.text
    assert "sample s-0000009 embedding en: holds NaN/Inf" in caplog.text


@pytest.mark.parametrize("claim", [300_000_000, 10**12, -5, "8", True, 100])
def test_a_manifest_count_that_cannot_be_true_is_refused_before_anything_is_sized_from_it(tmp_path, claim):
    """300M (index: 5) used to build a 300M-entry order and 1e12 to try a 7 TiB allocation; -5 was a traceback."""
    import json

    from helpers import synthetic_task

    from pipeline.shards.tasks import discover_tasks

    task = synthetic_task(tmp_path, "t", samples=10, per_shard=5)
    manifest = json.loads((task / "manifest.json").read_text())
    manifest["shards"][1]["samples"] = claim
    (task / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataConfigError) as refused:
        discover_tasks(str(tmp_path), None)
    message = str(refused.value)
    assert "manifest.json" in message and "src1/00000-000001.tar" in message and "shards_tools verify" in message


def test_a_manifest_count_its_index_contradicts_stops_the_stream_naming_both(tmp_path):
    """100 claimed where the index lists 8 used to train on while 92 of every 100 draws were skipped."""
    import json

    from helpers import synthetic_task

    from pipeline.shards.tasks import discover_tasks
    from pipeline.train.stream.dataset import MixedBatchDataset

    task = synthetic_task(tmp_path, "t", samples=10, per_shard=5)
    manifest = json.loads((task / "manifest.json").read_text())
    manifest["shards"][0]["samples"] = 6  # plausible for its size, but the index lists 5
    (task / "manifest.json").write_text(json.dumps(manifest))
    tasks = discover_tasks(str(tmp_path), None)
    config = StreamConfig(batch_size=1, seed=1, image_sample_size=16, text_drop_ratio=0.0, readahead_bytes=0)
    stream = iter(MixedBatchDataset(tasks, plan_mix(tasks, {"t": 1}, {"1": 1}), 0, 1, config))
    with pytest.raises(UnusableData, match=r"says 6 samples in .*00000-000000\.tar.* lists 5.*verify"):
        for _ in range(11):
            next(stream)


def test_a_workers_stop_reaches_the_run_as_its_own_line_naming_the_task(tmp_path):
    """With DataLoader workers the stop used to read "Caught UnusableData in DataLoader worker process 0." with the
    task named only inside a traceback."""
    from helpers import synthetic_task

    from pipeline.shards.tasks import discover_tasks
    from pipeline.train.config.data import DataConfig
    from pipeline.train.stream.dataset import MixedBatchDataset
    from pipeline.train.stream.loader import build_loader, next_batch, stop_workers

    synthetic_task(tmp_path, "garbage", samples=8, per_shard=4, image_bytes=b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    tasks = discover_tasks(str(tmp_path), None)
    config = StreamConfig(batch_size=1, image_sample_size=32, text_drop_ratio=0.0)
    dataset = MixedBatchDataset(tasks, plan_mix(tasks, {"garbage": 1}, {"1": 1}), 0, 1, config)
    batches = iter(build_loader(dataset, DataConfig(meta_dir=str(tmp_path), num_workers=1)))
    try:
        with pytest.raises(UnusableData) as stop:
            next_batch(batches, 0)
    finally:
        stop_workers(batches)
    message = str(stop.value)
    assert message.startswith("task garbage N=1: ") and "\n" not in message and "Caught" not in message, message


def test_a_streams_skips_are_logged_in_full_at_first_then_sparsely(caplog):
    from pipeline.train.stream.errors import LOUD_EVERY, LOUD_SKIPS, READ, ErrorHandler

    handler = ErrorHandler(limit=10_000)
    handler.register("k", "t", 1, shards=1, samples=None)
    with caplog.at_level("WARNING"):
        for i in range(1000):
            handler.handle("k", READ, OSError(f"bad {i}"), sample=f"s{i}")
    lines = [r.message for r in caplog.records]
    assert len(lines) == LOUD_SKIPS + 1 + (1000 // LOUD_EVERY), len(lines)
    assert "1000 skipped so far" in lines[-1] and "bad 999" in lines[-1]
