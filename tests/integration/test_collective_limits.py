"""--ddp_timeout: a rank that waits for rank 0 longer than the limit ends with one line naming the phase and the flag,
not a hang (NCCL's watchdog would kill the job with no word of why; the waits for rank 0 run on a gloo group with the
same limit)."""

from __future__ import annotations

import time

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
