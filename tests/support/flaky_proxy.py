"""An HTTP proxy in front of the S3 test server that fails some shard range reads with a 500."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ERROR_BODY = b"<?xml version='1.0'?><Error><Code>InternalError</Code><Message>injected</Message></Error>"


class FlakyProxy:
    """Forwards every request to ``upstream``; every ``fail_every``-th ranged GET of a .tar gets a 500."""

    def __init__(self, upstream: str, fail_every: int = 3):
        self.upstream = urlparse(upstream)
        self.fail_every = fail_every
        self.ranged_gets = 0
        self.failures = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                if self.command == "GET" and "Range" in self.headers and ".tar" in self.path:
                    with proxy._lock:
                        proxy.ranged_gets += 1
                        fail = proxy.ranged_gets % proxy.fail_every == 0
                        proxy.failures += fail
                    if fail:
                        self.send_response(500)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(ERROR_BODY)))
                        self.end_headers()
                        self.wfile.write(ERROR_BODY)
                        return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
