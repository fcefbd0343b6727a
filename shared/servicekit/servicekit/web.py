"""HTTP conventions every service of the stack shares (Flask).

One error shape `{"message", "errors"}`, strict JSON bodies (415, 400, 413), decimals never
parsed as floats, a correlation id per request, /health, /ready, /metrics and /openapi.json.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from flask import Blueprint, Flask, Response, g, jsonify, render_template_string, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field, PlainSerializer, ValidationError
from pydantic.json_schema import models_json_schema
from werkzeug.exceptions import HTTPException

from . import logs, tracing
from .auth import ANONYMOUS, PUBLIC, ApiKeys, Principal, declared_scope, public, requires
from .readiness import NotReady, Rebuilding

log = logging.getLogger("servicekit.web")

REQUEST_ID_HEADER = "X-Request-Id"
# A client's request id is kept only in this shape: it becomes the events' correlation id, an
# AMQP short string, and shows in logs; anything else is replaced by a generated one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class Invalid(Exception):
    """A request whose fields do not validate: 422 with the reasons per field."""

    def __init__(self, errors: dict[str, list[str]], message: str = "invalid fields") -> None:
        super().__init__(message)
        self.message, self.errors = message, errors


def problem(status: int, message: str, errors: dict[str, list[str]] | None = None) -> Response:
    response = jsonify({"message": message, "errors": errors or {}})
    response.status_code = status
    return response


def json_body() -> Any:
    """The request's JSON body, with decimals kept exact; 415, 400 or 413 when it is not."""
    raw = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
    if not raw.strip():  # empty is malformed, whatever the Content-Type says (or not)
        raise _Status(400, "the body is empty; a JSON object was expected")
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise _Status(415, "the body must be JSON (Content-Type: application/json)")
    try:
        return json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Status(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _Status(400, "the body is nested too deeply") from None


def json_object() -> dict[str, Any]:
    body = json_body()
    if not isinstance(body, dict):
        raise _Status(400, "the body must be a JSON object")
    return body


def validate(model: type[BaseModel], body: dict[str, Any]) -> BaseModel:
    """Validate a body against a pydantic model; Invalid (422) with reasons per field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise Invalid(field_errors(exc)) from None


def field_errors(exc: ValidationError) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in err["loc"]) or "body"
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        errors.setdefault(field, []).append(reason)
    return errors


def correlation_id() -> str:
    return g.get("correlation_id") or "-"


def principal() -> Principal:
    """Who is calling (ANONYMOUS where API keys are off or the route is public)."""
    return g.get("principal") or ANONYMOUS


def query_int(name: str, default: int, minimum: int, maximum: int) -> int:
    """An integer query parameter in plain ASCII digits; Invalid (422) for anything else
    (Unicode digits such as '²' or '٣' included, which str.isdigit would let through)."""
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12) or not (
        minimum <= int(raw) <= maximum
    ):
        raise Invalid({name: [f"must be a whole number from {minimum} to {maximum}"]})
    return int(raw)


class _Status(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def install(
    app: Flask,
    *,
    service: str,
    readiness: dict[str, Callable[[], None]],
    openapi: dict[str, Any],
    registry: CollectorRegistry,
    api_keys: ApiKeys | None = None,
    documentation_page: bool = True,
    unavailable: tuple[type[Exception], ...] = (),
) -> None:
    """Add the shared error handling, correlation ids, API keys, request metrics and the
    standard routes. Call it after the service's own routes are registered: every route must
    declare its scope (auth.requires or auth.public), or the app refuses to start. The
    `unavailable` exceptions (a store's driver saying it cannot reach it) answer 503."""
    app.json.sort_keys = False
    if tracing.configure(service):
        tracing.instrument_flask(app)
    if api_keys is None:
        log.warning("%s: API_KEYS is not set: every route is open (development only)", service)
    duration = Histogram(
        "http_request_duration_seconds",
        "HTTP request duration",
        ["method", "route", "status"],
        registry=registry,
    )
    responses = Counter("http_responses", "HTTP responses", ["route", "status"], registry=registry)

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        g.correlation_id = incoming if _REQUEST_ID.fullmatch(incoming) else str(uuid.uuid4())
        g.log_binding = logs.correlation_id.set(g.correlation_id)  # on every log line
        g.principal = ANONYMOUS

    @app.before_request
    def _authorize() -> Response | None:
        view = app.view_functions.get(request.endpoint or "")
        scope = declared_scope(view)
        if api_keys is None or view is None or scope == PUBLIC:
            return None  # keys off, a 404 or 405 to come, or an open route
        found = api_keys.verify(request.headers.get("Authorization"))
        if found is None:
            response = problem(401, "a valid API key is required (Authorization: Bearer <key>)")
            response.headers["WWW-Authenticate"] = f'Bearer realm="{service}"'
            return response
        if scope not in found.scopes:
            response = problem(403, f"this API key lacks the {scope} scope")
            response.headers["WWW-Authenticate"] = (
                f'Bearer realm="{service}", error="insufficient_scope", scope="{scope}"'
            )
            return response
        g.principal = found
        return None

    @app.teardown_request
    def _unbind(_exc: BaseException | None) -> None:
        if "log_binding" in g:
            logs.correlation_id.reset(g.log_binding)

    @app.after_request
    def _finish(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        status = str(response.status_code)
        if "started" in g:
            duration.labels(request.method, route, status).observe(time.perf_counter() - g.started)
        responses.labels(route, status).inc()
        response.headers[REQUEST_ID_HEADER] = correlation_id()
        return response

    @app.errorhandler(Invalid)
    def _invalid(exc: Invalid) -> Response:
        return problem(422, exc.message, exc.errors)

    @app.errorhandler(_Status)
    def _status(exc: _Status) -> Response:
        return problem(exc.status, exc.message)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        messages = {413: "the body is too large", 404: "not found"}
        response = problem(exc.code or 500, messages.get(exc.code, exc.description or exc.name))
        for name, value in exc.get_headers():
            if name.lower() != "content-type":  # e.g. Allow on a 405
                response.headers[name] = value
        return response

    for kind in unavailable:  # a store that does not answer: try again, not a bug (500)

        @app.errorhandler(kind)
        def _unavailable(exc: Exception) -> Response:
            log.warning("a store does not answer (%s) [%s]", type(exc).__name__, correlation_id())
            response = problem(503, "a store this service needs does not answer; try again")
            response.headers["Retry-After"] = "5"
            return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception(
            "unhandled error on %s %s [%s]", request.method, request.path, correlation_id()
        )
        return problem(500, "internal error; the request id is in the X-Request-Id header")

    registry.register(_ReadinessCollector(readiness))
    standard = Blueprint("standard", __name__)

    @standard.get("/health")
    @public
    def health() -> Response:
        return jsonify({"status": "ok", "service": service})

    @standard.get("/ready")
    @public
    def ready() -> Response:
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
        response = jsonify({"status": status, "checks": checks})
        response.status_code = 200 if status == "ready" else 503
        return response

    @standard.get("/metrics")
    @requires("metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    @standard.get("/openapi.json")
    @public
    def openapi_document() -> Response:
        return jsonify(openapi)

    if documentation_page:  # a service with pages of its own puts them at its root instead

        @standard.get("/")
        @public
        def documentation() -> Response:
            """The API's documentation, for people: rendered from the OpenAPI document."""
            page = render_template_string(_DOCUMENTATION, api=openapi, service=service)
            return Response(page, content_type="text/html; charset=utf-8")

    app.register_blueprint(standard)
    _document_security(app, openapi)


_DOCUMENTATION = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ service }} API</title>
<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}
code{background:#f3f3f3;padding:0 .2em}td,th{text-align:left;padding:.3em .6em;vertical-align:top}
tr:nth-child(even){background:#fafafa}.m{font-weight:bold;font-family:monospace}</style></head>
<body><h1>{{ api.info.title }} API</h1>
<p>JSON in and out; errors are <code>{"message", "errors"}</code>. Machine-readable:
{% for path in api.paths if path.endswith(".json") %}<a href="{{ path }}">{{ path }}</a>
({{ api.paths[path].get.summary }}){% if not loop.last %}, {% endif %}{% endfor %}.
Routes with a scope take <code>Authorization: Bearer &lt;key&gt;</code>.</p>
<table><tr><th>method</th><th>path</th><th>what</th><th>scope</th><th>answers</th></tr>
{% for path, methods in api.paths.items() %}{% for method, op in methods.items() %}
<tr><td class="m">{{ method | upper }}</td><td><code>{{ path }}</code></td><td>{{ op.summary }}</td>
<td>{% for requirement in op.get("security", []) %}{{ requirement.bearer | join(", ") }}
{% else %}open{% endfor %}</td><td>{{ op.responses | join(" ") }}</td></tr>
{% endfor %}{% endfor %}</table></body></html>
"""


class _ReadinessCollector:
    """`service_ready{check}` (1 or 0) at scrape time, so alerts can page on a consumer or a
    sender that is not ready (the same checks as /ready)."""

    def __init__(self, readiness: dict[str, Callable[[], None]]) -> None:
        self.readiness = readiness

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

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


def _document_security(app: Flask, openapi: dict[str, Any]) -> None:
    """Write each route's declared scope into the OpenAPI document; refuse undeclared routes."""
    undeclared = []
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault(
        "Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    )
    problem_body = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    openapi["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "an API key (API_KEYS)"}
    }
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        scope = declared_scope(app.view_functions[rule.endpoint])
        if scope is None:
            undeclared.append(rule.rule)
            continue
        path = _PARAMETER.sub(r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            operation = openapi.get("paths", {}).get(path, {}).get(method.lower())
            if operation is not None:
                operation["security"] = [] if scope == PUBLIC else [{"bearer": [scope]}]
                if scope != PUBLIC:
                    operation["responses"].setdefault(
                        "401", {"description": "no or unknown API key", "content": problem_body}
                    )
                    operation["responses"].setdefault(
                        "403",
                        {
                            "description": f"the API key lacks the {scope} scope",
                            "content": problem_body,
                        },
                    )
    if undeclared:
        raise RuntimeError(f"routes without a declared scope: {', '.join(sorted(undeclared))}")


_PARAMETER = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")


# Date-times in answers as Python writes them (2026-11-23T10:59:35.869687+00:00), as events do.
IsoDateTime = Annotated[datetime, PlainSerializer(datetime.isoformat, return_type=str)]


def body(model: type[BaseModel], **fields: Any) -> dict[str, Any]:
    """An answer built from the model that documents it in OpenAPI: it cannot say otherwise."""
    return model.model_validate(fields).model_dump(mode="json")


class Problem(BaseModel):
    """The one error shape of every service."""

    message: str
    errors: dict[str, list[str]] = Field(default_factory=dict)


class Health(BaseModel):
    status: str
    service: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


class OpenApi:
    """Builds an OpenAPI 3.1 document whose schemas come from the pydantic models."""

    def __init__(self, title: str, version: str = "1.0.0") -> None:
        self.title, self.version = title, version
        self.paths: dict[str, dict[str, Any]] = {}
        self.models: set[type[BaseModel]] = set()
        self.route("GET", "/health", "The process is up", responses={200: Health})
        self.route(
            "GET",
            "/ready",
            "Store and broker reachable, consumer attached",
            responses={200: Readiness, 503: Readiness},
        )
        self.route(
            "GET",
            "/metrics",
            "Prometheus metrics",
            responses={200: "text/plain; version=0.0.4; charset=utf-8"},
        )
        self.route("GET", "/openapi.json", "This document", responses={200: "application/json"})
        self.route("GET", "/", "This API's documentation, for people", responses={200: "text/html"})

    def route(
        self,
        method: str,
        path: str,
        summary: str,
        *,
        body: type[BaseModel] | tuple[type[BaseModel], ...] | None = None,
        responses: dict[int, type[BaseModel] | str | None],
        parameters: list[dict[str, Any]] | None = None,
    ) -> None:
        operation: dict[str, Any] = {"summary": summary, "responses": {}}
        if parameters:
            operation["parameters"] = parameters
        if body is not None:
            # Several models: the body is any of them (e.g. when a path parameter picks one).
            bodies = body if isinstance(body, tuple) else (body,)
            self.models.update(bodies)
            schema = _ref(bodies[0]) if len(bodies) == 1 else {"anyOf": [_ref(m) for m in bodies]}
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            }
        for status, model in responses.items():
            if isinstance(model, type) and issubclass(model, BaseModel):
                self.models.add(model)
                content = {"application/json": {"schema": _ref(model)}}
                operation["responses"][str(status)] = {
                    "description": model.__name__,
                    "content": content,
                }
            elif isinstance(model, str):  # a content type: a document, a page, plain text
                shape = {"type": "object"} if model.endswith("json") else {"type": "string"}
                operation["responses"][str(status)] = {
                    "description": model,
                    "content": {model: {"schema": shape}},
                }
            else:
                operation["responses"][str(status)] = {"description": "no content"}
        self.paths.setdefault(path, {})[method.lower()] = operation

    def document(self) -> dict[str, Any]:
        _, schemas = models_json_schema(
            [(m, "validation") for m in sorted(self.models, key=lambda m: m.__name__)],
            ref_template="#/components/schemas/{model}",
        )
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version},
            "paths": self.paths,
            "components": {"schemas": schemas.get("$defs", {})},
        }


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def path_parameter(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }
