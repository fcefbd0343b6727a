"""`GET /health` (the process answers) and `GET /ready` (what it needs answers too: stores,
broker, consumers making progress), with `service_ready{check}` for alerts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, current_app, jsonify
from flask_openapi3 import APIBlueprint, OpenAPI, Tag
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel

from .auth import public
from .readiness import NotReady, Rebuilding

Checks = dict[str, Callable[[], None]]


class Health(BaseModel):
    status: str
    service: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


def init_app(app: OpenAPI, service: str, readiness: Checks, registry: CollectorRegistry) -> None:
    """Each readiness check returns when ready and raises why not (NotReady, Rebuilding)."""
    app.extensions["servicekit.health"] = (service, readiness)
    registry.register(_ReadinessCollector(readiness))
    app.register_api(_routes())


def ready(readiness: Checks) -> Readiness:
    checks, status = {}, "ready"
    for name, check in readiness.items():
        try:
            check()
            checks[name] = "ok"
        except Rebuilding as exc:
            checks[name] = f"rebuilding: {exc}"
            status = "rebuilding" if status == "ready" else status
        except NotReady as exc:
            checks[name] = f"failing: {exc}"
            status = "not ready"
        except Exception as exc:  # a store's own error: its type only, never its details
            checks[name] = f"failing: {type(exc).__name__}"
            status = "not ready"
    return Readiness(status=status, checks=checks)


def _routes() -> APIBlueprint:
    routes = APIBlueprint("health", __name__, abp_tags=[Tag(name="service")])

    @routes.get("/health", responses={200: Health})
    @public
    def health() -> Response:
        """The process is up"""
        service, _ = current_app.extensions["servicekit.health"]
        return jsonify(Health(status="ok", service=service).model_dump())

    @routes.get("/ready", responses={200: Readiness, 503: Readiness})
    @public
    def readiness() -> Response:
        """Stores and broker reachable, consumers attached and making progress"""
        _, checks = current_app.extensions["servicekit.health"]
        found = ready(checks)
        response = jsonify(found.model_dump())
        response.status_code = 200 if found.status == "ready" else 503
        return response

    return routes


class _ReadinessCollector:
    """`service_ready{check}` (1 or 0) at scrape time, so alerts can page on a consumer or a
    sender that is not ready (the same checks as /ready)."""

    def __init__(self, readiness: Checks) -> None:
        self.readiness = readiness

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily(
            "service_ready", "1 when the /ready check passes", labels=["check"]
        )
        for name, check in self.readiness.items():
            try:
                check()
                family.add_metric([name], 1)
            except Exception:
                family.add_metric([name], 0)
        yield family
