"""A consumer process that is operable on its own: /health, /ready and /metrics over HTTP with no
web framework, and one call that runs it until SIGTERM.

    consumer = build(settings)
    run(consumer, health_port=8181)   # GET :8181/ready says why it is not ready

`/health` answers 200 while the process runs; `/ready` 200 while the consumer is attached and
applying (503 with the reason otherwise: its worker, a pause and why, a stall, a rebuild); and
`/metrics` the consumer's own counters in Prometheus's text format (the same families an API
exports for its replicas, messaging.replicas).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from servicekit.runner import configure_logging, replica_id, run_until_signalled

from .consumer import Consumer
from .replicas import consumer_metrics

log = logging.getLogger("messaging.operable")


class _Collector:
    def __init__(self, consumer: Consumer, replica: str) -> None:
        self.consumer, self.replica = consumer, replica

    def collect(self) -> Any:
        yield from consumer_metrics({self.replica: self.consumer.stats.snapshot()})


def serve_health(consumer: Consumer, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve /health, /ready and /metrics for `consumer` on a thread; returns the server (its
    `shutdown()` stops it; port 0 picks a free one: `server.server_address`)."""
    registry = CollectorRegistry()
    registry.register(_Collector(consumer, replica_id()))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self._answer(200, "application/json", json.dumps({"status": "ok"}).encode())
            elif self.path == "/ready":
                report = consumer.report() if consumer.attached.is_set() else "not attached"
                ready = report == "ok"
                body = json.dumps({"status": "ready" if ready else "not ready", "reason": report})
                self._answer(200 if ready else 503, "application/json", body.encode())
            elif self.path == "/metrics":
                self._answer(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            else:
                self._answer(404, "application/json", b'{"message": "not found"}')

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:  # probes every few seconds: no access log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="consumer-health", daemon=True).start()
    log.info("health and metrics of %s on http://%s:%d", consumer.topology.queue, host, port)
    return server


def run(consumer: Consumer, *, health_port: int | None = None, host: str = "127.0.0.1") -> int:
    """Run a consumer as a process: JSON logs, /health, /ready and /metrics on `health_port`
    (if given), until SIGTERM or SIGINT stops it cleanly; exit status 0."""
    configure_logging()
    server = serve_health(consumer, health_port, host) if health_port is not None else None
    try:
        return run_until_signalled(consumer)
    finally:
        if server is not None:
            server.shutdown()
