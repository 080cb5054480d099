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
