"""pipeline/train/stream/state.py: the data state's pure functions (no dataset, no files)."""

from __future__ import annotations

import pytest

from pipeline.shards.tasks import DataConfigError
from pipeline.train.stream import state as states
from pipeline.train.stream.dataset import PartitionStream


def stream_state(part: int, parts: int, k: int, pools=None) -> dict:
    return {"digest": "d", "indexed": True, "generation": 0, "skipped": 1,
            "pools": pools or {"arrivals": 0, "fallbacks": 0, "pools": []},
            "cursor": {"part": part, "parts": parts, "base": 0, "k": k, "earlier": []}}  # fmt: skip


def test_a_partition_that_never_read_a_stream_takes_part_in_its_take_over_as_having_consumed_nothing():
    """Partition 1 of 3 never drew task b: its (absent) state counts as an untouched cursor of the same layout, so
    the merge still sees every partition (it used to be built by hand in state.py, without the pools' fallbacks)."""
    partitions = [
        {"streams": {"a|1": stream_state(0, 3, 4), "b|1": stream_state(0, 3, 2)}},
        {"streams": {"a|1": stream_state(1, 3, 5)}},
        {"streams": {"a|1": stream_state(2, 3, 4), "b|1": stream_state(2, 3, 1)}},
    ]
    by_stream = states.takeover_states(partitions, PartitionStream.untouched_state)
    assert sorted(o["cursor"]["part"] for o in by_stream["a|1"]) == [0, 1, 2]
    filled = next(o for o in by_stream["b|1"] if o["cursor"]["part"] == 1)
    assert filled["cursor"]["k"] == 0 and filled["skipped"] == 0
    assert filled["pools"] == {"arrivals": 0, "fallbacks": 0, "pools": []}
    assert partitions[1]["streams"] == {"a|1": stream_state(1, 3, 5)}, "the saved states are not changed"


def test_the_next_step_of_another_layout_is_where_the_first_rank_stopped():
    loader = {"_snapshot": {"_worker_snapshots": {
        "worker_0": {"dataset_state": {"base": 10, "made": 3, "streams": {}}},
        "worker_1": {"dataset_state": {"base": 10, "made": 2, "streams": {}}},
    }}}  # fmt: skip
    next_step, partitions = states.elastic_resume([loader, loader])
    assert next_step == 15 and len(partitions) == 4
    assert states.same_layout([loader, loader], world=2, workers=2)
    assert not states.same_layout([loader, loader], world=2, workers=0)  # in-process loader: another layout


def test_a_worker_state_is_checked_before_anything_is_restored():
    with pytest.raises(DataConfigError, match="version 9"):
        states.check_version({"version": 9})
    with pytest.raises(DataConfigError, match="2 rank"):
        states.check_same_layout({"workers": 1, "world_size": 2}, workers=1, world=1)
    assert states.untouched({"made": 0, "streams": {}}) and not states.untouched({"made": 1, "streams": {}})
    old = {"version": 1, "streams": {"t|2": {"x": 1}}}
    assert states.stream_states(old) == [("t", 2, None)]  # positions of version 1 cannot be mapped
    assert states.stream_states({**old, "version": 2}) == [("t", 2, {"x": 1})]
