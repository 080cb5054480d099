"""pipeline/common/workers.py in processes of their own: a SIGTERM outside training, a loader worker's Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.common import workers

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_a_sigterm_outside_training_runs_the_finally_blocks_and_exits_143():
    """``exit_on_sigterm`` (extraction, the tools): leases are released and spools removed on the way out."""
    code = (
        f"import os, signal\nfrom {workers.__name__} import exit_on_sigterm\nexit_on_sigterm()\n"
        "try:\n    os.kill(os.getpid(), signal.SIGTERM)\n    import time; time.sleep(30)\n"
        "finally:\n    print('released')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 128 + signal.SIGTERM and out.stdout.strip() == "released", out.stderr[-1000:]


def test_a_training_loader_worker_leaves_ctrl_c_to_the_main_process():
    code = (
        f"import os, signal\nfrom {workers.__name__} import stream_worker_init\nstream_worker_init()\n"
        "os.kill(os.getpid(), signal.SIGINT)\nprint('alive')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "alive", out.stderr[-1000:]
