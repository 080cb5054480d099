"""pipeline/common/collective.py: the run's own collectives; one process is a group of its own.

Two real gloo ranks (torchrun on this machine) are in tests/integration/test_collective_limits.py: the values,
a refusal on rank 0 reaching every rank as the same line, a bug as rank 0's failure.
"""

from __future__ import annotations

from pipeline.common.collective import Collective


def test_one_process_is_its_own_group_without_a_process_group():
    alone = Collective(0, 1)
    assert alone.number(5) == 5 and alone.text("x") == "x" and alone.smallest(3) == 3 and alone.any(True)
    with alone.phase("nothing to wait for"):
        alone.barrier()
