"""The lease on a folder one run writes: a second launch is refused, a crashed holder taken over.

Extraction takes one per rank of a task directory (``_progress/lease-rank-{r}.json``),
training one for its run folder (``.lease.json``). The lease names the holder's
host, pid, pid space (boot and pid namespace) and start time, and is renewed in
a thread; :class:`RankLease` says how a new launch tells a live holder from a
gone one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from pipeline.errors import UserError
from pipeline.shards.storage import Store

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_pid_space() -> str | None:
    """Which pids this process can see: the machine's boot and our pid namespace (Linux). Two processes with the same
    value see the same processes, so one's pid is alive to the other exactly when it runs; None elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return f"{boot.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, /proc/PID/stat field 22): tells a process from a later one that
    reuses its pid. None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


LEASE_TTL = 60.0  # seconds without renewal after which a rank's lease is free
LEASE_RENEW = 10.0


class LeaseHeld(UserError):
    """Another live run writes this folder (or this rank of the task directory)."""


class RankLease:
    """Which run writes a rank of this task directory: refuses a second run instead of letting both write.

    A second run on the same output would delete the first run's published but
    not yet committed shard as an orphan and reuse its sequence numbers.  The
    lease (``path``: run id, host, pid, renewal
    time) is renewed every 10 s.  On the same host a live pid is refused at once.
    The lease also names the holder's pid space (boot and pid namespace) and start
    time.  A holder in our pid space is exactly as alive as its process: a live one
    is refused at once, a crashed one (its pid gone, or now another process's) is
    taken over at once.  A holder on the same host name whose pid space is another
    (a container that hides its processes) is taken over only when its lease was
    not renewed for two renewal periods: a recent renewal counts as alive whatever
    the pid says.  From another host a new run waits for a renewal (the holder is
    alive: refused) or for 60 s without one (gone: taken over), so a restart after
    a crash on another node waits up to a minute.
    """

    def __init__(
        self,
        store: Store,
        rank: int,
        path: str,
        wait: float = LEASE_TTL,
        renew_every: float = LEASE_RENEW,
        what: str | None = None,
    ):
        self.store, self.renew_every = store, renew_every
        self.path = path
        self.what = what or f"rank {rank} of {store.root}"
        pid = os.getpid()
        self.mine = {"run_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": pid,
                     "pid_space": this_pid_space(), "started": process_start(pid)}  # fmt: skip
        held = self._read()
        deadline = time.time() + wait
        while held and held.get("run_id") != self.mine["run_id"]:
            holder = self._holder_here(held)
            if holder == "alive":
                raise LeaseHeld(self._refusal(held))
            if holder == "gone":
                break
            if holder == "hidden":  # not visible from here: gone, unless the lease was renewed since it could have died
                renewed = held.get("renewed")
                renewed = float(renewed) if isinstance(renewed, int | float) else 0.0
                deadline = min(deadline, renewed + 2 * renew_every)
            if time.time() > deadline:
                break  # not renewed for a whole wait: gone
            time.sleep(min(1.0, renew_every / 4))
            now = self._read()
            if now and now.get("renewed") != held.get("renewed"):
                raise LeaseHeld(self._refusal(now))
            held = now
        self._write()
        time.sleep(0.2)  # two runs taking a free lease at once: the one whose write is not the last backs off
        if (self._read() or {}).get("run_id") != self.mine["run_id"]:
            raise LeaseHeld(f"another run took {self.what} at the same moment; use one run")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{rank}", daemon=True)
        self._thread.start()

    def _read(self) -> dict[str, Any] | None:
        try:
            held = self.store.read_json(self.path)
        except (FileNotFoundError, ValueError):
            return None
        return held if isinstance(held, dict) else None

    def _write(self) -> None:

        self.store.write_json(self.path, {**self.mine, "renewed": time.time()})

    def _refusal(self, held: dict[str, Any]) -> str:
        return (
            f"another run ({held.get('host')}, pid {held.get('pid')}) is writing {self.what}; two runs on one "
            "output directory would overwrite each other's files. Stop it, or use another --output_dir"
        )

    def _holder_here(self, held: dict[str, Any]) -> str | None:
        """What this host can tell of the holder: "alive"; "gone" (in our pid space, its process is not running);
        "hidden" (the same host name, its pid not alive here, but maybe another container's); None: another host."""
        if held.get("host") != socket.gethostname():
            return None
        pid = held.get("pid")
        ours = held.get("pid_space") is not None and held.get("pid_space") == self.mine["pid_space"]
        if not isinstance(pid, int) or not pid_alive(pid):
            return "gone" if ours else "hidden"
        started = held.get("started")
        if ours and started is not None and process_start(pid) not in (None, started):
            return "gone"  # its pid now names a later process
        return "alive"

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self._write()
            except Exception as exc:  # a store hiccup: the next renewal tries again
                log.warning("could not renew %s: %s", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if (self._read() or {}).get("run_id") == self.mine["run_id"]:
            self.store.delete(self.path)
