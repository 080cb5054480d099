"""What every DataLoader worker process of ours does first: die with its parent.

A worker blocked writing to a dead parent's result pipe (or stuck in a storage
read) never reaches PyTorch's own parent check, and SIGTERM does not reach it:
after the main process is SIGKILLed (preemption, the OOM killer) such workers
lived on for hours holding hundreds of MB each.  Linux's parent-death signal
ends them with the parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
# Resolved in the parent, at import: a forked worker then calls prctl without dlopen/dlsym, which take the dynamic
# loader's lock, and a lock another thread of the parent held at the fork would never be released in the child.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(worker_id: int = 0) -> None:
    """``worker_init_fn``: SIGKILL this process when its parent dies (Linux; elsewhere a no-op)."""
    if _prctl is None:
        return
    parent = os.getppid()
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


WORKER_STOP_GRACE_S = 120  # a worker outlives a SIGTERM by this long at most (its parent ends it sooner)


def stream_worker_init(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the training loader: die with the parent; SIGINT and SIGTERM are the parent's to act on.

    Ctrl-C reaches the whole process group and SLURM signals every process of a
    step: the main process finishes its step and saves a checkpoint
    (``pipeline.train.engine.stopping``), which needs its workers alive until then.
    SIGINT is ignored; a SIGTERM arms an alarm instead of killing at once, so a
    worker nobody shuts down (Python's exit terminates daemonic children and joins
    them) still ends within :data:`WORKER_STOP_GRACE_S`.
    """
    die_with_parent(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.alarm(WORKER_STOP_GRACE_S))


def exit_on_sigterm() -> None:
    """Turn SIGTERM (torchrun stopping the other ranks after one failed, a scheduler's stop) into ``SystemExit``,
    so ``finally`` blocks run: leases are released and spooled partial shards removed, not left behind."""

    def stop(signum, frame):
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
