"""pipeline/train/engine/stopping.py: a signal during training is noted, agreed by the ranks, then ignored."""

from __future__ import annotations

import os
import signal

from pipeline.common import workers
from pipeline.common.collective import Collective
from pipeline.train.engine.stopping import StopRequest

SPECIFIES = ("pipeline.common.workers",)


def test_a_sigterm_during_steps_is_noted_not_fatal_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal while stopping: the first one stands
        assert stop.received == signal.SIGTERM
        assert stop.agreed(Collective(0, 1)) == signal.SIGTERM
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_no_signal_agrees_on_zero():
    assert StopRequest().agreed(Collective(0, 1)) == 0


def test_a_training_loader_worker_leaves_ctrl_c_to_the_main_process_and_dies_with_its_parent():
    """``stream_worker_init`` in this process (its handlers restored after): SIGINT ignored, SIGTERM arms the grace
    alarm, and (Linux) the parent-death signal is SIGKILL."""
    import ctypes
    import sys

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        workers.stream_worker_init()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert callable(signal.getsignal(signal.SIGTERM))
        if sys.platform.startswith("linux"):
            armed = ctypes.c_int(0)
            ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(armed), 0, 0, 0)  # PR_GET_PDEATHSIG
            assert armed.value == signal.SIGKILL
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(1, 0, 0, 0, 0)  # disarmed again for the test process
