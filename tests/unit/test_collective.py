"""pipeline/common/collective.py: the run's own collectives, on two real gloo ranks (torchrun on this machine).

Each rank runs the same script and prints what it got; the test reads both ranks' lines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.common.collective import Collective

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os
from pipeline.common.collective import Collective
from pipeline.common.process_group import join_process_group, leave_process_group
from pipeline.errors import UserError
join_process_group("cpu", timeout_s=60)
rank = int(os.environ["RANK"])
c = Collective(rank, 2, 60)
got = {"number": c.number(41 + rank), "text": c.text("from rank 0" if rank == 0 else None),
       "any": c.any(rank == 1), "none": c.any(False), "smallest": c.smallest(10 - rank)}
def refuse():
    raise UserError("--output_dir x is a file")
try:
    c.on_rank0(refuse)
except UserError as exc:
    got["refused"] = str(exc)
def bug():
    raise KeyError("oops")
try:
    c.on_rank0(bug)
except Exception as exc:
    got["bug"] = type(exc).__name__ + ": " + str(exc)
print("RESULT", rank, json.dumps(got), flush=True)
leave_process_group(together=True)
"""


def test_two_ranks_agree_and_a_refusal_on_rank_0_reaches_every_rank_as_the_same_line(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = {int(r): json.loads(v) for _, r, v in (line.split(" ", 2) for line in out.stdout.splitlines()
                                                     if line.startswith("RESULT"))}  # fmt: skip
    assert set(results) == {0, 1}
    for rank, got in results.items():
        assert got["number"] == 41 and got["text"] == "from rank 0", "rank 0's value reaches every rank"
        assert got["any"] is True and got["none"] is False and got["smallest"] == 9
        assert got["refused"] == "--output_dir x is a file", "the user's mistake: the same one line on every rank"
        assert got["bug"] == ("KeyError: 'oops'" if rank == 0 else "RuntimeError: rank 0 failed: KeyError: 'oops'")


def test_one_process_is_its_own_group_without_a_process_group():
    alone = Collective(0, 1)
    assert alone.number(5) == 5 and alone.text("x") == "x" and alone.smallest(3) == 3 and alone.any(True)
    with alone.phase("nothing to wait for"):
        alone.barrier()
