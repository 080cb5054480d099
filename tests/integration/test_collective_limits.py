"""--ddp_timeout: a rank that waits for rank 0 longer than the limit ends with one line naming the phase and the flag,
not a hang (NCCL's watchdog would kill the job with no word of why; the waits for rank 0 run on a gloo group with the
same limit)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from helpers import torchrun


def test_a_rank0_phase_longer_than_ddp_timeout_fails_naming_the_phase_and_the_flag_not_a_hang():
    started = time.monotonic()
    result = torchrun(2, "tests.support.rank0_phase", "2", "8", check=False, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    out = result.stdout
    assert "rank 1: exporting the weights (rank 0 writes them) took longer than --ddp_timeout 2 s" in out, out
    assert "raise --ddp_timeout" in out
    # rank 1 gives up after 2 s; torchrun then ends rank 0 too: well before rank 0's 8 s of work would end plus the
    # launcher's start (a few seconds) — 60 s would only pass if a rank hung
    assert elapsed < 60


def test_a_rank0_phase_within_ddp_timeout_passes():
    result = torchrun(2, "tests.support.rank0_phase", "30", "1", timeout=120)
    assert "rank 0: ok" in result.stdout and "rank 1: ok" in result.stdout


def test_ddp_timeout_is_an_option_of_both_clis_and_refuses_nonsense():
    from pipeline.extract.cli import config_from_argv as extract_config
    from pipeline.train.cli import build_parser
    from pipeline.train.config import config_from_args

    def train_config(argv):
        return config_from_args(build_parser().parse_args(argv))

    extract = ["in.jsonl", "--output_dir", "o", "--model_path", "m"]
    assert extract_config([*extract, "--ddp_timeout", "60"]).ddp_timeout == 60
    assert extract_config(extract).ddp_timeout == 24 * 3600
    common = ["--train_shards", "t=x.tar", "--max_train_steps", "1", "--data_only"]
    assert train_config([*common, "--ddp_timeout", "90"]).ddp_timeout == 90
    assert train_config(common).ddp_timeout == 1800
    import pytest

    from pipeline.errors import UserError

    with pytest.raises((UserError, SystemExit)):
        train_config([*common, "--ddp_timeout", "0"])


ROOT_DIR = Path(__file__).resolve().parents[2]
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
import sys
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as out:  # a file per rank: two ranks' prints can interleave
    json.dump(got, out)
leave_process_group(together=True)
"""


def test_two_ranks_agree_and_a_refusal_on_rank_0_reaches_every_rank_as_the_same_line(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path)]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT_DIR), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert set(results) == {0, 1}
    for rank, got in results.items():
        assert got["number"] == 41 and got["text"] == "from rank 0", "rank 0's value reaches every rank"
        assert got["any"] is True and got["none"] is False and got["smallest"] == 9
        assert got["refused"] == "--output_dir x is a file", "the user's mistake: the same one line on every rank"
        assert got["bug"] == ("KeyError: 'oops'" if rank == 0 else "RuntimeError: rank 0 failed: KeyError: 'oops'")


def test_a_group_of_one_on_a_free_port_when_asked_alone():
    """FSDP over one rank needs a group: ``alone`` starts a gloo group of one on a free local port (own process)."""
    code = (
        "import torch.distributed as d; from pipeline.common.process_group import join_process_group, "
        "leave_process_group; join_process_group('cpu', timeout_s=30, alone=True); "
        "print(d.get_world_size(), d.get_backend()); leave_process_group(together=True)"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT_DIR)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "gloo"]
