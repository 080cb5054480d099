"""Read-ahead: the range reads of samples a worker will need next, in flight on a few threads.

Indexed streams know their next elements (the order is computed), so each worker
keeps several reads in flight instead of one after another: a sample's json and
images in one range read, then the embedding variant drawn for that element.  On
an object store 20 ms away this hides the latency; on a local disk it overlaps
I/O with decoding.  What is in flight is bounded in bytes for the whole worker.
Nothing here is part of the resume state: an element read ahead but not taken is
simply read again after a resume.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

READAHEAD_THREADS = 8


class ReadAhead:
    """A worker's read-ahead threads and the bytes they may hold."""

    def __init__(self, max_bytes: int, threads: int = READAHEAD_THREADS):
        self.max_bytes = max_bytes
        self.used = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="readahead") if max_bytes > 0 else None

    @property
    def enabled(self) -> bool:
        return self._pool is not None

    def try_submit(self, size: int, fn: Callable[[], Any]) -> Future | None:
        """Start ``fn`` in the background if ``size`` more bytes fit; None when the budget is spent."""
        with self._lock:
            if self._pool is None or (self.used and self.used + size > self.max_bytes):
                return None
            self.used += size
        return self._pool.submit(fn)

    def release(self, size: int) -> None:
        with self._lock:
            self.used -= size


class Prefetch:
    """The read-ahead stage of one indexed stream: element reads started before the elements are taken.

    ``read(g)`` and ``size_of(g)`` are the read stage's (a lower stage, passed in). A read
    that fails in the background — or whose size cannot even be known — fails again, once,
    when its element is taken, so the stream's error handler sees every failure exactly
    once and nothing is swallowed here.
    """

    def __init__(self, pool: ReadAhead | None, read: Callable[[int], Any], size_of: Callable[[int], int], depth: int):
        self.pool, self.read, self.size_of, self.depth = pool, read, size_of, depth
        self.ahead: dict[int, tuple[Future, int]] = {}  # element -> (read in flight, bytes reserved)

    def take(self, g: int) -> Any:
        """Element ``g``: from the read in flight, else read now (either raises the read's error)."""
        pending = self.ahead.pop(g, None)
        if pending is None:
            return self.read(g)
        future, size = pending
        try:
            return future.result()
        finally:
            if self.pool is not None:
                self.pool.release(size)

    def plan(self, upcoming: list[int]) -> None:
        """Start the reads of ``upcoming`` elements that fit the worker's read-ahead budget."""
        if self.pool is None or not self.pool.enabled:
            return
        for g in upcoming:
            if g in self.ahead:
                continue
            try:
                size = self.size_of(g)
            except Exception as exc:  # noqa: BLE001 - kept for the element: it fails when taken, once
                failed: Future = Future()
                failed.set_exception(exc)
                self.ahead[g] = (failed, 0)
                continue
            future = self.pool.try_submit(size, lambda g=g: self.read(g))
            if future is None:
                return
            self.ahead[g] = (future, size)

    def drop(self) -> None:
        """Forget reads in flight (their elements are read again when taken)."""
        for future, size in self.ahead.values():
            future.cancel()
            if self.pool is not None:
                self.pool.release(size)
        self.ahead.clear()
