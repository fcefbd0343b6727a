"""JSON in and out, as every service of the stack speaks it (Flask).

Strict JSON bodies (400, 413, 415 in the one error shape of errors.py), decimals never parsed as
floats, answers built from the model that documents them, and the OpenAPI document's builder.
The other concerns register themselves with their own init_app: correlation, access, errors,
metrics, health, docs.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from flask import Flask, request
from pydantic import BaseModel, PlainSerializer, ValidationError
from pydantic.json_schema import models_json_schema

from .errors import BadBody, Invalid, field_errors
from .health import Health, Readiness


def new_app(service: str) -> Flask:
    """A Flask app that answers JSON in the declared field order."""
    app = Flask(service)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    return app


def json_body() -> Any:
    """The request's JSON body, with decimals kept exact; 415, 400 or 413 when it is not."""
    raw = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
    if not raw.strip():  # empty is malformed, whatever the Content-Type says (or not)
        raise BadBody(400, "the body is empty; a JSON object was expected")
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise BadBody(415, "the body must be JSON (Content-Type: application/json)")
    try:
        return json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadBody(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadBody(400, "the body is nested too deeply") from None


def json_object() -> dict[str, Any]:
    body = json_body()
    if not isinstance(body, dict):
        raise BadBody(400, "the body must be a JSON object")
    return body


def validate(model: type[BaseModel], body: dict[str, Any]) -> BaseModel:
    """Validate a body against a pydantic model; Invalid (422) with reasons per field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise Invalid(field_errors(exc)) from None


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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


# Date-times in answers as Python writes them (2026-11-23T10:59:35.869687+00:00), as events do.
IsoDateTime = Annotated[datetime, PlainSerializer(datetime.isoformat, return_type=str)]


def body(model: type[BaseModel], **fields: Any) -> dict[str, Any]:
    """An answer built from the model that documents it in OpenAPI: it cannot say otherwise."""
    return model.model_validate(fields).model_dump(mode="json")


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
