"""pipeline/train/stream/sources.py: the two source strategies behind one interface, on real tar shards.

Indexed shards (an index and a sample count per shard) and shards that can only be read
front to back (``pipe:``) are the two strategies; a partition stream asks either the same
five things (next, reread, state, waiting, merge) and never which one it holds.
"""

from __future__ import annotations

import pytest
from helpers import synthetic_task

from pipeline.shards.reader import IndexCache, RangeReader
from pipeline.shards.tasks import DataConfigError, discover_tasks, task_from_patterns
from pipeline.train.config.data import StreamConfig
from pipeline.train.stream.dataset import sample_bytes
from pipeline.train.stream.errors import ErrorHandler
from pipeline.train.stream.pools import ByteBudget
from pipeline.train.stream.read import IndexedReads
from pipeline.train.stream.readahead import ReadAhead
from pipeline.train.stream.sources import IndexedSource, StreamedSource, WorkerReads, open_source

SPECIFIES = ("pipeline.train.stream.read",)
SAMPLES, PER_SHARD = 12, 4


def source_of(shards, part: int = 0, parts: int = 1, shuffle_buffer: int = 0):
    config = StreamConfig(batch_size=1, shuffle_buffer=shuffle_buffer, image_sample_size=32)
    handler = ErrorHandler(config.max_bad_in_a_row)
    handler.register("t|1", "t", 1, len(shards), None)
    reader = RangeReader(None, policy=handler)
    worker = WorkerReads(reader, IndexCache(reader), handler, ByteBudget(1 << 30), ReadAhead(0))
    return open_source("t", 1, shards, part, parts, config, worker, "t|1", sample_bytes)


@pytest.fixture
def shards(tmp_path):
    folder = synthetic_task(tmp_path, "t", samples=SAMPLES, per_shard=PER_SHARD)
    indexed = discover_tasks(str(tmp_path), None)["t"].shards[1]
    streamed = task_from_patterns("t", [f"pipe:cat {folder}/src1/00000-{{000000..000002}}.tar"], None).shards[1]
    return indexed, streamed


def test_each_kind_of_shard_gets_its_strategy_and_both_give_every_sample_once_an_epoch(shards):
    indexed, streamed = shards
    first, second = source_of(indexed), source_of(streamed, shuffle_buffer=4)
    assert isinstance(first, IndexedSource) and isinstance(second, StreamedSource)
    for source in (first, second):
        keys = [source.next()[1].key for _ in range(SAMPLES)]
        assert len(set(keys)) == SAMPLES, f"{type(source).__name__}: a sample twice in one epoch"
        assert all(sample.choice is not None for _, sample in [source.next()]), "the draws are decided"
    assert set(first.state_dict()) == {"cursor"}
    assert set(second.state_dict()) == {"seq", "rng", "buffer"}


def test_partitions_of_one_layout_share_the_epoch_without_overlap(shards):
    for kind in shards:
        parts = [source_of(kind, part, 2) for part in range(2)]
        keys = [{p.next()[1].key for _ in range(SAMPLES // 2)} for p in parts]
        assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == SAMPLES


def test_a_restored_source_goes_on_where_the_saved_one_was(shards):
    for kind in shards:
        source = source_of(kind, shuffle_buffer=3)
        [source.next() for _ in range(5)]
        state = source.state_dict()
        expected = [source.next()[1].key for _ in range(6)]
        again = source_of(kind, shuffle_buffer=3)
        again.load_state_dict(state, again.reread(again.waiting(state)))
        assert [again.next()[1].key for _ in range(6)] == expected


def test_only_an_indexed_source_takes_another_layout_over(shards):
    indexed, streamed = shards
    olds = [source_of(indexed, part, 2) for part in range(2)]
    for old in olds:
        old.next()
    new = source_of(indexed, 0, 3)
    mine = new.merge([o.state_dict() for o in olds], waiting=[0, 3, 4, 6, 7])
    assert mine == [0, 3, 6], "the waiting elements this partition owns now (g % 3 == 0), in order"
    streamed_source = source_of(streamed)
    with pytest.raises(DataConfigError, match="same ranks × DataLoader workers"):
        streamed_source.check_takeover()
    with pytest.raises(DataConfigError, match="same ranks × DataLoader workers"):
        streamed_source.merge([streamed_source.state_dict()], [])


def test_an_indexed_read_refuses_a_manifest_that_lies_about_a_shards_count(shards):
    """The order is sized from the manifest's counts; an index that lists another count stops the read (the
    stream's handler then counts it), instead of reading a sample the order never owned."""
    import dataclasses

    from pipeline.train.stream.errors import UnusableData
    from pipeline.train.stream.order import IndexedOrder

    indexed, _ = shards
    lying = [dataclasses.replace(indexed[0], samples=PER_SHARD + 1), *indexed[1:]]
    config = StreamConfig(batch_size=1, image_sample_size=32)
    reader = RangeReader(None)
    order = IndexedOrder([s.samples for s in lying], 0, (1, 1), 0, 1)
    reads = IndexedReads("t", 1, lying, order, reader, IndexCache(reader), config)
    first_of_shard_0 = next(g for g in range(3 * PER_SHARD + 1) if order.locate(g)[0] == 0)
    with pytest.raises(UnusableData, match=f"the manifest says {PER_SHARD + 1} samples"):
        reads.read(first_of_shard_0)
    honest = IndexedReads("t", 1, indexed, IndexedOrder([PER_SHARD] * 3, 0, (1, 1), 0, 1), reader,
                          IndexCache(reader), config)  # fmt: skip
    assert honest.read(0).key and honest.read(0).choice is not None
