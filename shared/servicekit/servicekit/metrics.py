"""Prometheus metrics: each request's duration and status by route template, `GET /metrics`,
and figures read at scrape time (an outbox's backlog, the last reports of a consumer's replicas)
when Prometheus asks, not as they change."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, current_app, g, request
from flask_openapi3 import APIBlueprint, OpenAPI, Tag
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import Metric

from .auth import requires
from .web import content


def init_app(app: OpenAPI, registry: CollectorRegistry) -> None:
    """Measure every request and serve the registry at /metrics (the `metrics` scope). Call it
    before access.init_app, so that refused requests are measured too."""
    app.extensions["servicekit.metrics"] = _RequestMetrics(registry)
    app.before_request(_start)
    app.after_request(_finish)
    app.register_api(_routes())


class _RequestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration",
            ["method", "route", "status"],
            registry=registry,
        )
        self.responses = Counter(
            "http_responses", "HTTP responses", ["route", "status"], registry=registry
        )


def _start() -> None:
    g.started = time.perf_counter()


def _finish(response: Response) -> Response:
    measured: _RequestMetrics = current_app.extensions["servicekit.metrics"]
    route = request.url_rule.rule if request.url_rule else "unmatched"  # a template, not a CPF
    status = str(response.status_code)
    if "started" in g:
        elapsed = time.perf_counter() - g.started
        measured.duration.labels(request.method, route, status).observe(elapsed)
    measured.responses.labels(route, status).inc()
    return response


def _routes() -> APIBlueprint:
    routes = APIBlueprint("metrics", __name__, abp_tags=[Tag(name="service")])

    @routes.get("/metrics", responses={200: content(CONTENT_TYPE_LATEST, "Prometheus metrics")})
    @requires("metrics")
    def metrics() -> Response:
        """Prometheus metrics"""
        registry = current_app.extensions["servicekit.metrics"].registry
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    return routes


class ScrapeCollector:
    """Metrics read at scrape time: `read()` fetches values from a store, `build(values)` turns
    them into metric families. A store that does not answer yields nothing (its API's /ready
    says why), and neither does a `read()` that returns None."""

    def __init__(self, read: Callable[[], Any], build: Callable[[Any], Iterator[Metric]]) -> None:
        self.read, self.build = read, build

    def collect(self) -> Iterator[Metric]:
        try:
            values = self.read()
        except Exception:
            return
        if values is not None:
            yield from self.build(values)
