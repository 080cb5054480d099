"""The stream's one error handler: what a read, a sample or a shard that fails costs, decided in one place.

Like webdataset's ``handler`` passed through every stage, one :class:`ErrorHandler`
per DataLoader worker receives every failure of every stage and decides alone:

* the **reader** and the **read-ahead** ask it whether a failed read is tried again
  (it is the reader's :class:`~pipeline.shards.reader.RetryPolicy`);
* a sample that stays unreadable (``read``), a streamed item that is corrupt or the
  rest of a streamed shard that cannot be read (``item``), and a sample whose image,
  embedding or prompt length fails while its batch is assembled (``assemble``) are
  handed to :meth:`ErrorHandler.handle`: it skips and counts the sample (the count is
  in the data state) and logs it, and the run goes on; a shard that is gone or
  forbidden, or too many failures in a row, stop the run with one line
  (:class:`UnusableData`, exit 2).

"In a row" is kept per stream and per kind, because each kind ends differently: reads
end a run of failures at the next sample read (a whole pass of an indexed task failing
is enough to know), assembly ends one when a batch is assembled (a replacement that
reads fine and fails to decode must still count).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.errors import DataError
from pipeline.shards.reader import READ_RETRIES, RetryPolicy

log = logging.getLogger(__name__)

READ, ITEM, ASSEMBLE = "read", "item", "assemble"  # the stages that hand failures to the handler
DATA_ERROR = "data_error"  # a worker's "batch" that carries the run's stop (its one-line message) to the main process
LOUD_SKIPS = 20  # a stream's first skips are each logged; after them every LOUD_EVERY-th, with the count so far
LOUD_EVERY = 100


class UnusableData(DataError):
    """Data a running stream cannot use: a shard gone or forbidden, a manifest its index contradicts, every sample
    of a stream failing. One line naming the task and what to check, exit 2."""


class NoUsableSample(Exception):
    """A whole pass over a streamed source's shards gave nothing usable."""


class UnusableSample(Exception):
    """Sample ``index`` of a batch cannot be used (raised by assembly; the stream replaces the sample)."""

    def __init__(self, index: int, cause: Exception):
        super().__init__(f"sample {index} of the batch: {type(cause).__name__}: {cause}")
        self.index, self.cause = index, cause


@dataclass
class StreamCounts:
    """One (task, N) stream's failures: skipped in all, and the current runs of failures in a row."""

    task: str
    n: int
    shards: int
    read_limit: int
    skipped: int = 0
    read_failures: int = 0  # in a row, since the last sample read
    unusable: int = 0  # in a row, since the last batch assembled

    @property
    def where(self) -> str:
        return f"task {self.task} N={self.n}"


class ErrorHandler(RetryPolicy):
    """Every failure of one DataLoader worker's streams: retry, skip and count, or stop with one line."""

    def __init__(self, limit: int, retries: int = READ_RETRIES):
        super().__init__(retries)
        self.limit = limit  # failures in a row before a stream stops
        self.streams: dict[str, StreamCounts] = {}

    def register(self, key: str, task: str, n: int, shards: int, samples: int | None) -> StreamCounts:
        """A stream's counters; ``samples``: an indexed stream's size (a whole pass failing is enough to know)."""
        read_limit = min(self.limit, samples) if samples else self.limit
        self.streams[key] = StreamCounts(task, n, shards, read_limit)
        return self.streams[key]

    def fatal(self, counts: StreamCounts, exc: BaseException) -> BaseException | None:
        """The error that stops the run for ``exc``, or None when the sample is to be skipped."""
        if isinstance(exc, DataError | KeyboardInterrupt):
            return exc
        if isinstance(exc, NoUsableSample):
            return UnusableData(
                f"task {counts.task}: no usable sample with {counts.n} source(s) in a whole pass "
                f"over its {counts.shards} shard(s) (every one unreadable, truncated or empty)"
            )
        if isinstance(exc, FileNotFoundError):  # a shard that is gone does not come back by retrying
            return UnusableData(f"{counts.where}: a shard is missing: {exc}")
        if isinstance(exc, PermissionError):
            return UnusableData(f"{counts.where}: a shard cannot be read: {exc}")
        return None

    def handle(self, key: str, stage: str, problem: BaseException | str, sample: str | None = None) -> None:
        """A failure at ``stage`` of stream ``key``: returns when the sample is skipped, raises to stop the run."""
        counts = self.streams[key]
        if isinstance(problem, BaseException):
            stop = self.fatal(counts, problem)
            if stop is problem:
                raise problem
            if stop is not None:
                raise stop from problem
            reason = f"{type(problem).__name__}: {problem}"
        else:
            reason = problem
        counts.skipped += 1
        what = f"sample {sample}" if sample else "a sample"
        if counts.skipped <= LOUD_SKIPS or counts.skipped % LOUD_EVERY == 0:
            if stage == ASSEMBLE:
                log.warning(
                    "%s: %s unusable (%s); replaced by another of its bucket (%d skipped so far)",
                    counts.where, what, reason, counts.skipped,
                )  # fmt: skip
            else:
                log.warning("%s: skipped %s (%s; %d skipped so far)", counts.where, what, reason, counts.skipped)
            if counts.skipped == LOUD_SKIPS:
                log.warning("%s: from here on every %dth skip is logged", counts.where, LOUD_EVERY)
        if stage == READ:
            counts.read_failures += 1
            if counts.read_failures >= counts.read_limit:
                raise UnusableData(
                    f"{counts.where}: {counts.read_failures} unreadable samples in a row, the last: {reason}"
                )
        elif stage == ASSEMBLE:
            counts.unusable += 1
            if counts.unusable > self.limit:  # every replacement failed too: the data is unusable, do not spin
                raise UnusableData(
                    f"{counts.where}: {counts.unusable} samples in a row could not be used (images, embeddings "
                    "or prompt lengths); check it with python -m shards_tools verify"
                )

    def passed(self, key: str, stage: str) -> None:
        """A sample was read (``read``) or a batch assembled (``assemble``): that kind's run of failures ends."""
        counts = self.streams[key]
        if stage == READ:
            counts.read_failures = 0
        elif stage == ASSEMBLE:
            counts.unusable = 0
