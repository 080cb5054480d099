"""A static HTTP server with byte-range support (what object stores and CDNs give), for tests and benchmarks.

``delay_ms`` holds every response back that long: an object store 20 ms away, for
the loader's latency benchmark.  ``python tests/support/range_server.py ROOT
[--delay_ms 20]`` serves ROOT and prints its URL.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class RangeServer:
    def __init__(self, root: Path, delay_ms: float = 0.0):
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _serve(self, body: bool):
                path = Path(root) / self.path.split("?", 1)[0].lstrip("/")
                server.requests.append((self.path, self.headers.get("Range")))
                if delay_ms:
                    time.sleep(delay_ms / 1000)
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                start, end = 0, size - 1
                match = re.match(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1) or 0)
                    end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                if body:
                    with open(path, "rb") as handle:
                        handle.seek(start)
                        self.wfile.write(handle.read(end - start + 1))

            def do_GET(self):
                self._serve(True)

            def do_HEAD(self):
                self._serve(False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    p = argparse.ArgumentParser(description="serve a folder over HTTP with byte ranges (and an optional delay)")
    p.add_argument("root")
    p.add_argument("--delay_ms", type=float, default=0.0, help="hold every response back this long")
    args = p.parse_args()
    with RangeServer(Path(args.root), args.delay_ms) as server:
        print(server.url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


if __name__ == "__main__":
    main()
