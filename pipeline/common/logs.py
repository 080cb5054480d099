"""Logging set-up shared by the CLIs: one format, the rank in every prefix; stacks on SIGUSR1."""

from __future__ import annotations

import faulthandler
import io
import logging
import signal
import sys

from pipeline.common.process_group import distributed_env


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger with ``[rank R]`` in the prefix; returns the project logger."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {distributed_env().rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    dump_stacks_on_sigusr1()
    return logging.getLogger("pipeline")


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's Python stack to stderr and the process goes on.

    For a run that seems stuck: DataLoader workers forked after this inherit it, so each
    process of a hung run (rank, worker) can say where it waits.  The test helpers send it
    before they kill a subprocess that ran past its time limit.
    """
    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, io.UnsupportedOperation):  # stderr replaced by one without a descriptor
        return
