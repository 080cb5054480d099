"""The stream's one error policy: what a sample that cannot be used costs, decided in one place.

Like webdataset's ``handler`` passed through every stage, one :class:`SkipPolicy`
per stream receives every failure — a sample that cannot be read (a source), a
streamed item that is corrupt (the streamed source's ``on_skip``), an image or
embedding that cannot be decoded while its batch is assembled (``replace``) — and
answers the same way: a shard that is gone or forbidden stops the run with a
message; a bad sample is skipped, counted (``skipped``, in the data state) and
logged, and the run goes on; too many in a row stop it instead of spinning.

"In a row" is kept per kind, because each kind ends differently: reads end a
run of failures at the next sample read (a whole pass of an indexed task failing
is enough to know), decoding ends one when a batch is assembled (a replacement
that reads fine and fails to decode must still count).
"""

from __future__ import annotations

import logging

from pipeline.shards.tasks import DataConfigError

log = logging.getLogger(__name__)


class NoUsableSample(Exception):
    """A whole pass over a streamed source's shards gave nothing usable."""


class SkipPolicy:
    """Every failure of one (task, N) stream of a worker: skip and count, or stop with a message."""

    def __init__(self, task: str, n: int, shards: int, limit: int, read_limit: int | None = None):
        self.where = f"task {task} N={n}"
        self.task, self.n, self.shards = task, n, shards
        self.limit = limit  # failures in a row before the stream stops
        self.read_limit = min(limit, read_limit) if read_limit else limit  # indexed: a whole pass is enough
        self.skipped = 0
        self.read_failures = 0  # in a row, since the last sample read
        self.unusable = 0  # in a row, since the last batch assembled

    def fatal(self, exc: BaseException) -> BaseException | None:
        """The error that stops the run for ``exc``, or None when the sample is to be skipped."""
        if isinstance(exc, DataConfigError | KeyboardInterrupt):
            return exc
        if isinstance(exc, NoUsableSample):
            return DataConfigError(
                f"task {self.task}: no usable sample with {self.n} source(s) in a whole pass "
                f"over its {self.shards} shard(s) (every one unreadable, truncated or empty)"
            )
        if isinstance(exc, FileNotFoundError):  # a shard that is gone does not come back by retrying
            return DataConfigError(f"{self.where}: a shard is missing: {exc}")
        if isinstance(exc, PermissionError):
            return DataConfigError(f"{self.where}: a shard cannot be read: {exc}")
        return None

    def read_failed(self, exc: Exception) -> None:
        """A sample could not be read: skipped, unless it is fatal or the reads failed ``read_limit`` times in a
        row."""
        stop = self.fatal(exc)
        if stop is exc:
            raise exc
        if stop is not None:
            raise stop from exc
        self.skipped += 1
        self.read_failures += 1
        log.warning(
            "%s: skipped a sample (%s: %s; %d skipped so far)", self.where, type(exc).__name__, exc, self.skipped
        )
        if self.read_failures >= self.read_limit:
            raise RuntimeError(f"{self.where}: {self.read_failures} unreadable samples in a row") from exc

    def read_ok(self) -> None:
        self.read_failures = 0

    def corrupt(self, reason: str) -> None:
        """A streamed item its source found corrupt (the source itself stops on a whole unusable pass)."""
        self.skipped += 1
        log.warning("%s: skipped %s", self.where, reason)

    def undecodable(self, key: str, exc: Exception) -> None:
        """A sample whose image or embedding failed while its batch was assembled; it is replaced."""
        self.skipped += 1
        self.unusable += 1
        log.warning("%s: sample %s unusable (%s: %s); replaced", self.where, key, type(exc).__name__, exc)
        if self.unusable > self.limit:  # every replacement failed too: the data is unusable, do not spin
            raise DataConfigError(
                f"{self.where}: {self.unusable} samples in a row could not be decoded "
                "(images or embeddings); check it with python -m shards_tools verify"
            )

    def batch_assembled(self) -> None:
        self.unusable = 0
