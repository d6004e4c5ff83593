"""The HTTP probe server of the stream processes (scorer, monitor): /metrics (Prometheus),
/healthz (alive: every loop makes progress), /readyz (ready to serve)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def serve(
    port: int,
    *,
    healthy: Callable[[], tuple[bool, dict[str, object]]],
    readiness: Callable[[], tuple[bool, dict[str, object]]],
    host: str = "0.0.0.0",
) -> ThreadingHTTPServer:
    """Start the server in a daemon thread; returns it (call `shutdown()` to stop)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok, detail = healthy()
                body = orjson.dumps({"alive": ok, **detail})
                self._send(200 if ok else 503, body, "application/json")
            elif self.path == "/readyz":
                ok, detail = readiness()
                self._send(
                    200 if ok else 503, orjson.dumps({"ready": ok, **detail}), "application/json"
                )
            else:
                self._send(404, b'{"detail": "not found"}', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="scorer-http", daemon=True).start()
    return server
