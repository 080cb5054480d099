"""SIGTERM and SIGINT end a run with a checkpoint, not with lost work.

SLURM, Kubernetes and spot instances send SIGTERM before the kill; Ctrl-C sends
SIGINT. Either one is noted here; every rank finishes the step it is in, the
ranks agree at the step's end that one of them was asked to stop, save one
checkpoint together and exit with ``128 + signal`` (143 for SIGTERM, 130 for
SIGINT). A second signal while stopping is logged and otherwise ignored, so it
cannot cut a save short (a save is atomic anyway: SIGKILL leaves the previous
checkpoint as ``latest``).

Outside the steps (loading the model, building the stream, exporting) there is
no step to finish: :func:`stop_outside_steps` makes either signal end the run at
once with :class:`StoppedOutsideSteps` — one line, the same exit codes, the run
folder's lease released on the way out — rather than Python's ``KeyboardInterrupt``
traceback or the kernel's silent ``-15`` that left the lease behind.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("pipeline.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The run stopped on a signal after saving ``checkpoint``; the process exits with ``exit_code``."""

    def __init__(self, step: int, signum: int, checkpoint):
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}: saved {checkpoint}; continue with "
            "--resume_from_checkpoint latest"
        )


class StoppedOutsideSteps(BaseException):
    """SIGTERM / SIGINT outside the training steps: nothing to save by this stop; the process exits ``128 + N``.
    A ``BaseException``, as ``KeyboardInterrupt`` is: no ``except Exception`` on the way may swallow it."""

    def __init__(self, signum: int):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} outside the training steps (loading, setting up or exporting): "
            "this stop saved nothing; rerun the command to go on (--resume_from_checkpoint latest continues from "
            "the newest checkpoint, if any)"
        )


def stop_outside_steps() -> None:
    """From now on SIGTERM and SIGINT raise :class:`StoppedOutsideSteps` (main thread), until the training loop
    installs its :class:`StopRequest` (which restores this when the loop ends)."""

    def stop(signum, frame):
        for other in STOP_SIGNALS:  # a second signal must not cut the way out (the lease's release) short
            signal.signal(other, signal.SIG_IGN)
        raise StoppedOutsideSteps(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)


class StopRequest:
    """Notes SIGTERM / SIGINT (main thread) instead of dying; :meth:`signum` is the first one received."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            log.warning(
                "%s received: finishing this step, then saving a checkpoint and exiting (SIGKILL stops at once)",
                signal.Signals(signum).name,
            )
        else:
            log.warning("%s received while stopping: the checkpoint is being saved", signal.Signals(signum).name)

    def agreed(self, collective) -> int:
        """Collective: the signal one of the ranks received (the largest number), or 0 when none did."""
        return -collective.smallest(-(self.received or 0))

    def ignore_more(self) -> None:
        """After the stop's save: later signals are ignored by the kernel, not reset to fatal by Python's exit
        (which restores the default disposition of the handlers it installed, and a late second SIGTERM would then
        end the process with -15 instead of the documented exit code)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
