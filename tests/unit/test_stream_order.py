"""Training stream v2: the computed sample-level order, exactly-once cursors across layouts, bounded pools
(on plain integers), and the same through the real stream on synthetic shards."""

from __future__ import annotations

import importlib
import json
import logging
import threading

import numpy as np
import pytest
from helpers import encode_image, synthetic_task

from pipeline.crops import crop_size
from pipeline.shards.reader import CorruptSample
from pipeline.shards.tasks import DataConfigError, discover_tasks, task_from_patterns
from pipeline.train.config.data import StreamConfig
from pipeline.train.stream.dataset import MixedBatchDataset
from pipeline.train.stream.errors import NoUsableSample, UnusableData
from pipeline.train.stream.mix import plan_mix
from pipeline.train.stream.order import (
    BLOCK_SAMPLES,
    Cursor,
    EpochOrder,
    IndexedOrder,
    StreamedOrder,
    merge_cursors,
    ref_key,
)
from pipeline.train.stream.pools import BucketPools, ByteBudget, ShuffleBuffer
from pipeline.train.stream.readahead import Prefetch, ReadAhead

SPECIFIES = (
    "pipeline.train.stream.dataset",
    "pipeline.train.stream.order",
    "pipeline.train.stream.pools",
    "pipeline.train.stream.readahead",
    "pipeline.train.stream.seeding",
)


def neighbour_fraction(refs: list[tuple[int, int]]) -> float:
    """Share of consecutive pairs that are adjacent samples of one shard (file order leaking through)."""
    pairs = list(zip(refs, refs[1:], strict=False))
    return sum(a[0] == b[0] and abs(a[1] - b[1]) == 1 for a, b in pairs) / len(pairs)


def test_the_epoch_order_is_a_permutation_that_forgets_file_order():
    counts = [100] * 20 + [37, 0, 63]
    order = EpochOrder(counts, seed=7, salt=(1, 1), block_samples=512)
    total = sum(counts)
    for epoch in (0, 1):
        refs = [order.locate(epoch * total + g) for g in range(total)]
        assert sorted(refs) == sorted((s, i) for s, c in enumerate(counts) for i in range(c)), "each sample once"
        assert neighbour_fraction(refs) < 0.01
    assert [order.locate(g) for g in range(50)] != [order.locate(total + g) for g in range(50)], "epochs differ"
    assert [order.locate(g) for g in range(50)] == [EpochOrder(counts, 7, (1, 1), 512).locate(g) for g in range(50)]
    # memory: at most two blocks' permutations (int32), never the epoch
    assert len(order._blocks) <= 2 and all(b.dtype == np.int32 and b.size <= 512 + 100 for b in order._blocks.values())
    big = EpochOrder([1000] * 10_000, seed=1, salt=(2,))  # 10⁷ samples
    big.locate(9_999_999)
    assert sum(b.nbytes for b in big._blocks.values()) <= 4 * (BLOCK_SAMPLES + 1000)


def consume(cursors: list[Cursor], steps: list[int]) -> list[int]:
    """Advance cursor i by steps[i]; the elements taken."""
    return [c.next() for c, n in zip(cursors, steps, strict=True) for _ in range(n)]


@pytest.mark.parametrize("layouts", [[4, 3], [4, 1], [2, 5], [4, 3, 2], [1, 3, 6, 2]])
def test_cursors_taken_over_by_another_layout_take_every_element_once(layouts):
    rng = np.random.default_rng(sum(layouts))
    cursors = [Cursor(p, layouts[0]) for p in range(layouts[0])]
    taken = consume(cursors, [int(x) for x in rng.integers(3, 40, size=layouts[0])])  # uneven progress
    for parts in layouts[1:]:
        cursors = merge_cursors([Cursor.from_state(json.loads(json.dumps(c.state_dict()))) for c in cursors], parts)
        taken += consume(cursors, [int(x) for x in rng.integers(3, 40, size=parts)])
    assert len(taken) == len(set(taken)), "no element twice"
    horizon = min(c.peek(1)[0] for c in cursors)
    assert set(range(horizon)) <= set(taken), "nothing before the slowest cursor skipped"
    assert len(cursors[0].state_dict()["earlier"]) <= len(layouts), "state stays a few integers per layout"


# ---- the source stages on plain integers ------------------------------------------------------------


def test_indexed_order_and_read_ahead_take_every_element_once_and_resume_from_the_order_state():
    """Order gives element ids only; the read-ahead stage reads ahead through the read function it is given."""
    counts = [7, 5, 9]
    loads = []
    parts = 3
    orders = [IndexedOrder(counts, 1, (4,), p, parts) for p in range(parts)]

    def reader_of(order):
        def read(g):
            loads.append(threading.current_thread().name)
            return order.locate(g)

        return Prefetch(ReadAhead(25), read, size_of=lambda g: 10, depth=4)

    aheads = [reader_of(o) for o in orders]

    def take(p):
        g = orders[p].next()
        item = aheads[p].take(g)
        aheads[p].plan(orders[p].peek(aheads[p].depth))
        return g, item

    epoch = [take(g % parts) for g in range(sum(counts))]
    assert [g for g, _ in epoch] == list(range(sum(counts)))  # partition p takes g ≡ p (mod parts)
    assert sorted(item for _, item in epoch) == sorted((s, i) for s, c in enumerate(counts) for i in range(c))
    # elements were read ahead: served by reads on the read-ahead threads (in-flight reads bounded by 25 bytes)
    assert any(name.startswith("readahead") for name in loads)
    state = json.loads(json.dumps(orders[1].state_dict()))
    after = [orders[1].next() for _ in range(5)]
    again = IndexedOrder(counts, 1, (4,), 1, parts)
    again.load_state_dict(state)
    assert [again.next() for _ in range(5)] == after


def test_a_read_ahead_failure_is_reported_once_when_its_element_is_taken_never_swallowed():
    """A read that fails in the background, or whose size cannot be known, raises when its element is taken — once
    — so the error handler sees it; the old read-ahead dropped a failing size silently."""
    reads = []

    def read(g):
        reads.append(g)
        if g == 2:
            raise OSError("reset by peer")
        return g * 10

    def size_of(g):
        if g == 3:
            raise KeyError("the index has no such sample")
        return 1

    ahead = Prefetch(ReadAhead(100), read, size_of, depth=4)
    ahead.plan([1, 2, 3, 4])
    assert ahead.take(1) == 10
    with pytest.raises(OSError, match="reset by peer"):
        ahead.take(2)
    with pytest.raises(KeyError, match="no such sample"):
        ahead.take(3)
    assert ahead.take(4) == 40
    assert ahead.pool.used == 0, "every reserved byte released, the failed reads' included"
    assert 3 not in reads, "an element whose size failed is not read in the background"


def test_streamed_source_partitions_each_pass_hands_on_bad_items_and_resumes_from_its_state():
    bad = CorruptSample("odd one")
    shards = [[*range(0, 4)], [100, bad, *range(102, 106)], [*range(200, 203)]]

    def make(part):
        return StreamedOrder(len(shards), 5, (1, 2), part, 2, read_shard=lambda i: iter(shards[i]))

    a, b = make(0), make(1)
    first_pass = [a.next()[1] for _ in range(7)] + [b.next()[1] for _ in range(6)]  # ordinals 0, 2, … are part 0's
    usable = [x for x in first_pass if not isinstance(x, CorruptSample)]
    assert sorted(usable) == sorted(x for shard in shards for x in shard if x is not bad)  # disjoint, complete
    assert first_pass.count(bad) == 1, "the corrupt item is handed on once, to its owner: the handler decides"
    state = json.loads(json.dumps(a.state_dict()))
    after = [a.next() for _ in range(7)]
    resumed = make(0)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(7)] == after
    good = [(ref, item) for ref, item in after if not isinstance(item, CorruptSample)][:3]
    assert resumed.reread([ref for ref, _ in good]) == {ref_key(ref): item for ref, item in good}

    nothing = StreamedOrder(2, 0, (1,), 0, 1, read_shard=lambda i: iter([CorruptSample("broken")] * 2))
    with pytest.raises(NoUsableSample):
        for _ in range(10):
            nothing.next()


def test_shuffle_buffer_mixes_stays_in_its_byte_budget_and_resumes_from_its_state():
    counter, taken = iter(range(10**6)), []

    def take():
        taken.append(next(counter))
        return taken[-1], taken[-1]

    budget = ByteBudget(50)
    buffer = ShuffleBuffer(8, np.random.default_rng([3, 1]), budget, size_of=lambda x: 10)
    out = [buffer.next(take)[1] for _ in range(40)]
    assert out != sorted(out) and len(set(out)) == 40
    assert budget.used <= 50 + 10 and len(buffer.items) <= 6  # the budget, not the size, bounds it here
    state = json.loads(json.dumps(buffer.state_dict()))
    held, resume_at = {ref: item for ref, item in buffer.items}, taken[-1] + 1
    follow = [buffer.next(take)[1] for _ in range(10)]
    counter = iter(range(resume_at, 10**6))  # the source resumes where it was at the checkpoint
    again = ShuffleBuffer(8, np.random.default_rng([3, 1]), ByteBudget(50), size_of=lambda x: 10)
    again.load_state_dict(state, held)
    assert [again.next(take)[1] for _ in range(10)] == follow


def test_pools_stay_bounded_when_every_sample_has_its_own_bucket():
    budget = ByteBudget(1 << 40)
    pools = BucketPools(batch_size=4, max_samples=16, budget=budget)
    batches, reads, first = [], 0, None
    for i in range(360):
        reads += 1
        batch = pools.add((float(i), float(i % 3)), i, size=10)  # a distinct tuple each; 3 target buckets
        assert len(pools) <= 16
        if batch:
            batches.append(batch)
            first = first or reads
    assert first <= 17, "the first batch within the bound's number of reads"
    emitted = [i for b in batches for i in b]
    assert len(emitted) == len(set(emitted)) and len(emitted) + len(pools) == 360, "every sample once"
    assert all(len({i % 3 for i in b}) == 1 for b in batches), "similar: one target bucket per batch"
    assert budget.used == 10 * len(pools)


def test_a_byte_budget_shared_by_streams_bounds_them_together():
    budget = ByteBudget(100)
    a, b = BucketPools(4, 1000, budget), BucketPools(4, 1000, budget)
    for i in range(200):
        (a if i % 2 else b).add((float(i),), i, size=10)
        assert budget.used <= 100 + 4 * 10


# --- through the real stream ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    synthetic_task(root, "big", samples=2000, per_shard=100)
    return root


def test_training_order_has_no_file_order_and_every_sample_once_per_epoch(big_task):
    tasks = discover_tasks(str(big_task), None)
    config = StreamConfig(batch_size=1, seed=3, image_sample_size=32, text_drop_ratio=0.0)
    dataset = MixedBatchDataset(tasks, plan_mix(tasks, {"big": 1}, {"1": 1}), 0, 1, config)
    keys = [b["keys"][0] for _, b in zip(range(2000), iter(dataset), strict=False)]
    assert len(set(keys)) == 2000, "every sample exactly once in the first epoch"
    position = {f"s-{i:07d}": (i // 100, i % 100) for i in range(2000)}
    assert neighbour_fraction([position[k] for k in keys]) < 0.01


def test_changed_shards_start_a_new_epoch_and_unknown_versions_are_refused(big_task, tmp_path, caplog):
    tasks = discover_tasks(str(big_task), None)
    config = StreamConfig(batch_size=1, seed=3, image_sample_size=32, text_drop_ratio=0.0)
    dataset = MixedBatchDataset(tasks, plan_mix(tasks, {"big": 1}, {"1": 1}), 0, 1, config)
    iterator = iter(dataset)
    for _ in range(5):
        next(iterator)
    state = json.loads(json.dumps(dataset.state_dict()))
    smaller = synthetic_task(tmp_path, "big", samples=1500, per_shard=100)  # shards removed since the checkpoint
    tasks2 = discover_tasks(str(smaller.parent), None)
    resumed = MixedBatchDataset(tasks2, plan_mix(tasks2, {"big": 1}, {"1": 1}), 0, 1, config)
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(resumed))
    assert "the shards changed since the checkpoint" in caplog.text and batch["keys"]
    assert batch["elements"][0] >= (1 << 32) * 1500, "a fresh epoch, not a replay of the old positions"
    future = MixedBatchDataset(tasks, plan_mix(tasks, {"big": 1}, {"1": 1}), 0, 1, config)
    future.load_state_dict({**state, "version": 99})
    with pytest.raises(DataConfigError, match="version 99"):
        next(iter(future))


def first_batch_within(dataset, seconds: float):
    """``next(iter(dataset))`` in a thread: (finished?, exception it raised)."""
    import threading

    outcome: list = []

    def run():
        try:
            next(iter(dataset))
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(outcome), (outcome[0] if outcome else None)


def test_a_streamed_task_of_only_broken_samples_is_an_error_not_a_spin(big_task, tmp_path):
    """Every sample of a streamed shard lacks its images: a whole pass with nothing usable raises (it looped)."""
    import tarfile

    from pipeline.shards.tasks import task_from_patterns

    shard = next((big_task / "big" / "src1").glob("*.tar"))
    broken = tmp_path / "src1" / "broken.tar"
    broken.parent.mkdir()
    with tarfile.open(shard) as tin, tarfile.open(broken, "w") as tout:
        for member in tin:
            if member.name.endswith(".json"):
                tout.addfile(member, tin.extractfile(member))
    task = task_from_patterns("broken", [f"pipe:cat {broken}"], None)
    config = StreamConfig(batch_size=1, shuffle_buffer=0)
    dataset = MixedBatchDataset({"broken": task}, plan_mix({"broken": task}, {"broken": 1}, {"1": 1}), 0, 1, config)
    finished, error = first_batch_within(dataset, 60)
    assert finished, "the stream spun without a batch or an error"
    assert isinstance(error, UnusableData) and "no usable sample" in str(error)


def test_the_cut_off_rest_of_a_streamed_shard_goes_to_the_handler_and_is_counted(big_task, tmp_path, caplog):
    """A streamed shard cut inside a member 60 % in: the reader used to end it with a warning of its own, uncounted;
    now the rest of the shard is one failure the stream's handler counts in the data state, and the stream goes on."""
    import tarfile

    shard = next((big_task / "big" / "src1").glob("*.tar"))
    cut = tmp_path / "src1" / "cut.tar"
    cut.parent.mkdir()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    inside = members[len(members) * 6 // 10]  # cut in its data: the tar reader fails there (a cut between
    cut.write_bytes(shard.read_bytes()[: inside.offset_data + inside.size // 2])  # members just ends the tar)
    task = task_from_patterns("cut", [f"pipe:cat {cut}"], None)
    config = StreamConfig(batch_size=1, shuffle_buffer=0, image_sample_size=32)
    dataset = MixedBatchDataset({"cut": task}, plan_mix({"cut": task}, {"cut": 1}, {"1": 1}), 0, 1, config)
    batches = iter(dataset)
    with caplog.at_level(logging.WARNING):
        keys = [next(batches)["keys"][0] for _ in range(70)]  # the shard holds 100 samples, 60 readable
    assert len(keys) == 70, "the stream went on into the next pass"
    stream = dataset._streams["cut|1"]
    assert stream.skipped >= 1, "the lost rest of the shard is counted"
    assert dataset.state_dict()["streams"]["cut|1"]["skipped"] == stream.skipped, "and saved with the data state"
    assert any("the rest of the shard" in r.getMessage() for r in caplog.records if r.name.endswith("errors"))


def test_the_stages_take_no_callback_into_the_stream_that_composes_them():
    """The stream composes its stages and calls them downward only: no method of the stream or the dataset is handed
    to a stage (the old stream gave its source load/size_of/bad/on_skip/choose and assembly a replace callback)."""
    import ast
    import inspect

    from pipeline.train.stream import dataset as dataset_module

    tree = ast.parse(inspect.getsource(dataset_module))
    own_methods = {
        f.name for c in tree.body if isinstance(c, ast.ClassDef) for f in c.body if isinstance(f, ast.FunctionDef)
    }
    stages = {"IndexedOrder", "StreamedOrder", "IndexedReads", "Prefetch", "ShuffleBuffer", "BucketPools",
              "IndexedSource", "StreamedSource", "open_source", "assemble_batch", "partial"}  # fmt: skip
    handed = []
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", None)) in stages:
            for arg in [*call.args, *(k.value for k in call.keywords)]:
                for node in ast.walk(arg):
                    composer = isinstance(node, ast.Attribute) and getattr(node.value, "id", None) in ("self", "stream")
                    if isinstance(node, ast.Lambda) or (composer and node.attr in own_methods):
                        handed.append(ast.unparse(arg))
    assert handed == [], f"callbacks handed to a stage: {handed}"
    for module in ("sources", "read", "readahead", "pools", "batching", "decide", "order", "errors"):
        source = inspect.getsource(importlib.import_module(f"pipeline.train.stream.{module}"))
        assert "stream.dataset" not in source and "stream.loader" not in source, f"{module} imports upward"


def test_an_indexed_task_whose_images_never_decode_is_an_error_not_a_spin(tmp_path):
    """Every image is garbage: replacements fail too; after 1,000 in a row it is an error (it looped)."""
    synthetic_task(tmp_path, "garbage", samples=40, per_shard=10, image_bytes=b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    tasks = discover_tasks(str(tmp_path), None)
    config = StreamConfig(batch_size=1, image_sample_size=32, text_drop_ratio=0.0)
    dataset = MixedBatchDataset(tasks, plan_mix(tasks, {"garbage": 1}, {"1": 1}), 0, 1, config)
    finished, error = first_batch_within(dataset, 120)
    assert finished, "the stream spun without a batch or an error"
    assert isinstance(error, UnusableData) and "could not be used" in str(error)


# ---- resume on any layout at any step: the real dataset under a loader that asks its workers in turn -----


class RoundRobinLoader:
    """What StatefulDataLoader does with an IterableDataset, in one process: each worker its own copy of the
    dataset (a fork), batches asked of the workers in turn from worker 0, states in the loader's JSON shape.
    ``workers=0`` is the main process iterating the dataset itself."""

    current: list = [None]  # the worker the dataset code runs as now (get_worker_info), shared by all loaders

    def __init__(self, make_dataset, workers: int, monkeypatch):
        from pipeline.train.stream import dataset as stream_mod

        self.workers, self.yielded = workers, 0
        self.datasets = [make_dataset() for _ in range(max(workers, 1))]
        self._iters: list = [None] * len(self.datasets)
        monkeypatch.setattr(stream_mod, "get_worker_info", lambda: RoundRobinLoader.current[0])

    def _as_worker(self, w: int):
        from types import SimpleNamespace

        RoundRobinLoader.current[0] = SimpleNamespace(id=w, num_workers=self.workers) if self.workers else None

    def next(self) -> dict:
        w = self.yielded % len(self.datasets)
        self._as_worker(w)
        if self._iters[w] is None:
            self._iters[w] = iter(self.datasets[w])
        self.yielded += 1
        return next(self._iters[w])

    def state_dict(self) -> dict:
        states = []
        for w, dataset in enumerate(self.datasets):
            self._as_worker(w)
            states.append(json.loads(json.dumps(dataset.state_dict())))
        if not self.workers:
            return {"dataset_state": states[0], "yielded": self.yielded}
        snapshots = {f"worker_{w}": {"dataset_state": s} for w, s in enumerate(states)}
        return {"_snapshot": {"_worker_snapshots": snapshots}, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        from pipeline.train.stream.state import worker_states

        # StatefulDataLoader's own checks: a state of the other kind (0 vs 1 worker) is an AssertionError there
        assert ("dataset_state" in state) == (not self.workers), "a loader state of the other kind"
        for dataset, own in zip(self.datasets, worker_states(state), strict=True):
            dataset.load_state_dict(own)
        self.yielded = state["yielded"]  # StatefulDataLoader resumes after the last worker it asked


@pytest.fixture(scope="module")
def two_small_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    synthetic_task(root, "a", samples=23, per_shard=5)
    synthetic_task(root, "b", samples=17, per_shard=6)
    return root


def layouts_run(tasks, plan, config, ranks, workers, steps, monkeypatch, resume_from=None):
    """``steps`` loader steps on every rank of ``ranks`` × ``workers``, resumed as DataPart.load does from the old
    ranks' loader states; returns (batches, each rank's loader state at the end)."""
    import copy

    from pipeline.train.stream.state import elastic_resume, same_layout

    def dataset_of(rank):
        return MixedBatchDataset(tasks, plan, rank, ranks, config)

    loaders, batches = [], []
    for rank in range(ranks):
        if resume_from is not None and not same_layout(resume_from, ranks, workers):
            main = dataset_of(rank)
            main.set_elastic(*elastic_resume(resume_from))
            loader = RoundRobinLoader(lambda main=main: copy.deepcopy(main), workers, monkeypatch)
        else:
            loader = RoundRobinLoader(lambda rank=rank: dataset_of(rank), workers, monkeypatch)
            if resume_from is not None:
                loader.load_state_dict(resume_from[rank])
        loaders.append(loader)
    for _ in range(steps):
        for loader in loaders:
            batches.append(loader.next())
    return batches, [loader.state_dict() for loader in loaders]


def test_resume_on_any_layout_at_any_step_trains_each_sample_once(two_small_tasks, monkeypatch):
    """Many (ranks × workers, checkpoint step, ranks' × workers') triples, chained twice: the steps go on from the
    checkpoint on every rank, N agrees across ranks, and no sample of either task comes twice or is skipped."""
    tasks = discover_tasks(str(two_small_tasks), None)
    plan = plan_mix(tasks, {"a": 2, "b": 1}, {"1": 1})
    config = StreamConfig(batch_size=1, seed=11, image_sample_size=16, text_drop_ratio=0.0, readahead_bytes=0)
    rng = np.random.default_rng(2026)
    reported = [  # the reported crashes, and a checkpoint before every new worker made a batch after a takeover
        ([(1, 0), (1, 2), (1, 2)], [3, 3, 2]),
        ([(1, 2), (1, 4), (1, 4)], [6, 3, 3]),
        ([(1, 2), (1, 3), (2, 1)], [4, 4, 2]),
        ([(2, 1), (1, 4), (1, 4)], [5, 1, 4]),
        ([(1, 0), (1, 1), (1, 0)], [3, 4, 2]),  # 0 and 1 workers: one dataset state each, not the same layout
        ([(1, 1), (1, 0), (1, 1)], [1, 2, 5]),
        ([(2, 0), (2, 1), (3, 0)], [2, 3, 3]),
    ]
    random = [
        (
            [(int(rng.integers(1, 4)), int(rng.integers(0, 5))) for _ in range(3)],
            [int(x) for x in rng.integers(1, 10, 3)],
        )
        for _ in range(14)
    ]
    for trial, (layouts, steps) in enumerate(reported + random):
        batches, states, done = [], None, 0
        for (ranks, workers), n in zip(layouts, steps, strict=True):
            got, states = layouts_run(tasks, plan, config, ranks, workers, n, monkeypatch, resume_from=states)
            expected = [(done + i, r) for i in range(n) for r in range(ranks)]
            assert [(b["step"], b["rank"]) for b in got] == expected, f"trial {trial}: {layouts}, steps {steps}"
            done += n
            batches += got
        where = f"trial {trial}: layouts {layouts}, steps {steps}"
        taken = [(b["task"], e) for b in batches for e in b["elements"]]
        assert len(taken) == len(set(taken)), f"{where}: a sample trained twice"
        n_by_step: dict[int, set] = {}
        for b in batches:
            n_by_step.setdefault(b["step"], set()).add(b["num_sources"])
        assert all(len(ns) == 1 for ns in n_by_step.values()), where
        for task in ("a", "b"):
            mine = {e for t, e in taken if t == task}
            horizon = next_untaken(states, f"{task}|1")
            assert set(range(horizon)) <= mine, f"{where}: task {task} skipped a sample below {horizon}"


def next_untaken(loader_states: list[dict], stream: str) -> int:
    """The first element of ``stream`` no partition of a layout will take again: the slowest partition's next
    (a partition that never read the stream starts where the others' merged cursors put it, at k = 0)."""
    from pipeline.train.stream.state import worker_states

    partitions = [w for state in loader_states for w in worker_states(state)]
    cursors = [Cursor.from_state(p["streams"][stream]["cursor"]) for p in partitions if stream in p["streams"]]
    if not cursors:
        return 0
    template = cursors[0]
    present = {c.part for c in cursors}
    cursors += [
        Cursor(p, template.parts, template.base, 0, template.earlier) for p in range(template.parts) if p not in present
    ]
    return min(c.peek(1)[0] for c in cursors)


def encoded(size, fmt, orientation=None, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return encode_image(Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR), fmt, orientation)


@pytest.mark.parametrize(
    "size,fmt,orientation,min_psnr",
    [
        ((900, 700), "PNG", None, 60),  # full decode: only the resize kernel differs (≤ 2/255)
        ((700, 1000), "JPEG", None, 60),
        ((1800, 1400), "JPEG", None, 34),  # ≥ 2× shrink: decoded at a reduced DCT scale
        ((2000, 800), "JPEG", 6, 34),  # rotated by EXIF, as load_image shows it
        ((800, 600), "JPEG", 8, 60),
    ],
)
def test_fast_decode_differs_from_the_pillow_path_by_resampling_noise_only(size, fmt, orientation, min_psnr):
    """The bound: PSNR ≥ 34 dB (mean |Δ| ≤ 0.03 of the [-1, 1] range) with a reduced-scale JPEG decode, ≥ 60 dB
    (a couple of 8-bit levels at most) otherwise, against today's open_rgb + Pillow bicubic path."""
    import torch

    from pipeline.common import images as imaging

    def to_tensor(img):  # the batch pixels before this change: PIL → float [-1, 1]
        return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)

    def pixels_to_tensor(pixels):  # what the loss does to the uint8 pixels now
        return pixels.float() / 127.5 - 1.0

    data = encoded(size, fmt, orientation)
    lazy = imaging.open_lazy(data)
    full = imaging.open_rgb(data)
    assert imaging.aspect_of(lazy) == pytest.approx(full.width / full.height), "aspect from the header, oriented"
    crop = crop_size(full.width / full.height, 512 * 512)
    old = to_tensor(imaging.resize_and_crop(full, crop, (0.3, 0.7)))
    new = pixels_to_tensor(imaging.decode_and_crop(lazy, data, crop, (0.3, 0.7)))
    assert new.shape == old.shape
    psnr = float(10 * torch.log10(4 / ((old - new) ** 2).mean().clamp_min(1e-12)))
    assert psnr >= min_psnr and float((old - new).abs().mean()) <= 0.03, psnr


def test_a_stalled_range_read_times_out_instead_of_hanging():
    import socket
    import threading
    import time

    from pipeline.shards.reader import RangeReader

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []

    def accept_and_stall():  # reads the request, never answers
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept_and_stall, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/shard.tar"
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - aiohttp's timeout type, after the retries
        RangeReader(None, timeout=0.5).read(url, 0, 100)
    assert time.monotonic() - started < 20, "bounded: retries × timeout, not a hang"
    listener.close()
    for conn in held:
        conn.close()


def test_a_streamed_shard_whose_read_breaks_is_reopened_where_it_stopped(big_task, tmp_path):
    """A connection reset halfway through a streamed (index-less) shard: reopened and continued, not cut short."""
    import io

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from pipeline.shards.reader import stream_shard

    shard = next((big_task / "big" / "src1").glob("*.tar"))
    data = shard.read_bytes()
    breaks = {"left": 1}

    class Breaking(io.BytesIO):
        def read(self, n=-1):
            if breaks["left"] and self.tell() > len(data) // 2:
                breaks["left"] -= 1
                raise ConnectionResetError("connection reset by peer (injected)")
            return super().read(n)

    class FlakyFS(MemoryFileSystem):
        protocol = "flakytest"

        def _open(self, path, mode="rb", **kwargs):
            return Breaking(data)

    fsspec.register_implementation("flakytest", FlakyFS, clobber=True)
    keys = [s.key for s in stream_shard("flakytest://bucket/shard.tar", None)]
    assert breaks["left"] == 0, "the read did break"
    assert keys == [s.key for s in stream_shard(str(shard), None)] and len(keys) == 100, "each once, in order"


def test_every_random_draw_has_a_named_purpose_and_keeps_its_first_written_seed():
    """seeding.py names each draw; the seeds are those the draws were first written with (a change would silently
    change every run's sample order), and no two purposes share one."""
    from pipeline.train.stream import seeding

    purposes = [v for v in vars(seeding).values() if isinstance(v, seeding.Purpose)]
    numbers = [p.number for p in purposes if p.number is not None]
    assert len(numbers) == len(set(numbers)) and len(purposes) == 7
    seed = (1 << 40) + 5  # masked to 32 bits, as before
    first_written = {
        seeding.SOURCE_COUNT: ((7,), [seed & 0xFFFFFFFF, 1, 7]),
        seeding.TASK: ((2, 7), [seed & 0xFFFFFFFF, 2, 2, 7]),
        seeding.CROP: ((2, 7), [seed & 0xFFFFFFFF, 4, 2, 7]),
        seeding.SHARD_ORDER: ((9, 3), [seed & 0xFFFFFFFF, 9, 3, 3]),
        seeding.BLOCK_ORDER: ((9, 3, 1), [seed & 0xFFFFFFFF, 9, 3, 1, 5]),
        seeding.VARIANT: ((9, 1, 11), [seed & 0xFFFFFFFF, 9, 1, 11, 7]),
        seeding.SHUFFLE_BUFFER: ((9, 1, 0), [seed & 0xFFFFFFFF, 9, 1, 0]),
    }
    for purpose, (keys, parts) in first_written.items():
        assert purpose.rng(seed, *keys).random(4).tolist() == np.random.default_rng(parts).random(4).tolist(), purpose
