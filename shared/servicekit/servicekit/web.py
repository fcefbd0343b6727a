"""JSON in and out, as every service of the stack speaks it (Flask with flask-openapi3).

Each route is declared once, on an `APIBlueprint`: its path, query and body models in the view's
signature, its answers in `responses=`, its scope with auth.requires or auth.public. The library
validates the request against those models before the view runs, and builds the OpenAPI
document out of the same declarations (docs.py serves it). Bodies stay strict whoever reads
them: 400 for malformed or empty JSON or anything but an object, 415 for a body that is not
JSON, 413 past the size limit, decimals parsed as `Decimal` (never float), NaN and Infinity
refused; 422 names the fields. The other concerns register themselves with their own
init_app: correlation, access, errors, metrics, health, docs.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from flask import Request, Response
from flask_openapi3 import Info, OpenAPI
from pydantic import BaseModel, BeforeValidator, PlainSerializer, ValidationError

from .errors import BadBody, Problem, field_errors, problem

# The models' declarations of a route's answers: `responses={201: PersonCreated, **BODY_ERRORS}`.
BODY_ERRORS: dict[int, type[BaseModel]] = {400: Problem, 413: Problem, 415: Problem, 422: Problem}


def new_app(service: str, version: str = "1.0.0") -> OpenAPI:
    """A Flask app whose routes, declared on APIBlueprints, make its OpenAPI document."""
    app = OpenAPI(
        service,
        info=Info(title=service, version=version),
        security_schemes={
            "bearer": {"type": "http", "scheme": "bearer", "description": "an API key (API_KEYS)"}
        },
        doc_ui=False,  # docs.init_app serves the document, and the UI at the root
        validation_error_status=422,
        validation_error_model=Problem,
        validation_error_callback=_invalid,
    )
    app.request_class = StrictRequest
    app.json.sort_keys = False  # type: ignore[attr-defined]  # answers in the declared order
    return app


class StrictRequest(Request):
    """A request whose JSON body is read strictly whoever reads it, and is an object: our bodies
    are. flask-openapi3 reads it with get_json(silent=True), which would turn malformed JSON or a
    body that is not JSON into None (a 422 about no field) and decimals into floats, and it parses
    a body that is a JSON string as JSON again (a double-encoded object would pass)."""

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        if not hasattr(self, "_strict_json"):
            self._strict_json = _json_object(self)
        return self._strict_json


def _json_object(request: Request) -> dict[str, Any]:
    found = _strict_json(request)
    if not isinstance(found, dict):
        raise BadBody(400, "the body must be a JSON object")
    return found


def _strict_json(request: Request) -> Any:
    raw = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
    if not raw.strip():  # empty is malformed, whatever the Content-Type says (or not)
        raise BadBody(400, "the body is empty; a JSON object was expected")
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise BadBody(415, "the body must be JSON (Content-Type: application/json)")
    try:
        return json.loads(raw, parse_float=Decimal, parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadBody(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadBody(400, "the body is nested too deeply") from None


def reject_constant(name: str) -> Any:
    """json.loads' parse_constant: NaN and Infinity are no numbers JSON allows."""
    raise ValueError(f"{name} is not a number JSON allows")


def _invalid(exc: ValidationError) -> Response:
    """A request that does not fit its route's models: 422 with the reasons per field."""
    return problem(422, "invalid fields", field_errors(exc))


def _plain_digits(value: Any) -> Any:
    """Refuse what int() would read but no client means: '²', '٣', ' 5', '1_000', '0x10'."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit() and len(value) <= 12):
        raise ValueError("must be a whole number in plain digits")
    return value


# A whole number in a query string, in plain ASCII digits (bounds go in Field(ge=, le=)).
WholeNumber = Annotated[int, BeforeValidator(_plain_digits)]

# Date-times in answers as Python writes them (2026-11-23T10:59:35.869687+00:00), as events do.
IsoDateTime = Annotated[datetime, PlainSerializer(datetime.isoformat, return_type=str)]


def body(model: type[BaseModel], **fields: Any) -> dict[str, Any]:
    """An answer built from the model that documents it in OpenAPI: it cannot say otherwise."""
    return model.model_validate(fields).model_dump(mode="json")


def content(mimetype: str, description: str) -> dict[str, Any]:
    """An answer that is not a JSON model (a page, plain text, a document), for `responses=`."""
    shape = {"type": "object"} if mimetype.endswith("json") else {"type": "string"}
    return {"description": description, "content": {mimetype: {"schema": shape}}}
