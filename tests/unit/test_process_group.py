"""pipeline/common/process_group.py, with the two modules that read where a process sits: devices and logs."""

from __future__ import annotations

import torch

from pipeline.common import devices, logs
from pipeline.common.process_group import distributed_env, join_process_group, leave_process_group

SPECIFIES = ("pipeline.common.devices", "pipeline.common.logs")


def test_the_launchers_variables_say_where_a_process_sits(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    alone = distributed_env()
    assert (alone.rank, alone.world, alone.local_rank, alone.node_rank, alone.fsdp_requested) == (0, 1, 0, 0, False)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("GROUP_RANK", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    env = distributed_env()
    assert (env.rank, env.world, env.local_rank, env.node_rank, env.fsdp_requested) == (5, 8, 1, 2, True)


def test_a_process_launched_alone_joins_no_group_unless_asked_and_leaving_none_is_harmless(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    join_process_group("cpu")
    assert not torch.distributed.is_initialized()
    leave_process_group(together=True)


def test_auto_is_this_ranks_gpu_in_bf16_else_the_cpu_in_fp32():
    where = devices.resolve_device("auto")
    assert where.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert devices.resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert devices.resolve_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_dtype("float16", torch.device("cpu")) is torch.float16


def test_every_log_line_names_the_rank(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "3")
    logs.setup_logging()
    import logging

    logging.getLogger("pipeline.test").warning("hello")
    assert "[rank 3] WARNING pipeline.test: hello" in capsys.readouterr().err
