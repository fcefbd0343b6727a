"""One error shape for every answer that is not a success: `{"message", "errors": {field:
[reasons]}}`, from 400 to 503; a 500 only for a bug, never for bad input."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from pydantic import BaseModel, Field, ValidationError
from werkzeug.exceptions import HTTPException

from .correlation import correlation_id

log = logging.getLogger("servicekit.errors")


class Problem(BaseModel):
    """The one error shape of every service."""

    message: str
    errors: dict[str, list[str]] = Field(default_factory=dict)


class Invalid(Exception):
    """A request whose fields do not validate: 422 with the reasons per field."""

    def __init__(self, errors: dict[str, list[str]], message: str = "invalid fields") -> None:
        super().__init__(message)
        self.message, self.errors = message, errors


class BadBody(Exception):
    """A body that cannot be read as what the route takes: 400, 413 or 415."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def problem(status: int, message: str, errors: dict[str, list[str]] | None = None) -> Response:
    response = jsonify({"message": message, "errors": errors or {}})
    response.status_code = status
    return response


def field_errors(exc: ValidationError) -> dict[str, list[str]]:
    """pydantic's errors as reasons per field ("cpf", "incomes.0.value"; "body" for the whole)."""
    errors: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in err["loc"]) or "body"
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        errors.setdefault(field, []).append(reason)
    return errors


def init_app(app: Flask, unavailable: tuple[type[Exception], ...] = ()) -> None:
    """Answer every error in the one shape. The `unavailable` exceptions (a store's driver saying
    it cannot reach it) answer 503 with Retry-After: try again, not a bug."""
    app.register_error_handler(Invalid, lambda exc: problem(422, exc.message, exc.errors))
    app.register_error_handler(BadBody, lambda exc: problem(exc.status, exc.message))
    app.register_error_handler(HTTPException, _http)
    for kind in unavailable:
        app.register_error_handler(kind, _unavailable)
    app.register_error_handler(Exception, _unexpected)


_MESSAGES = {413: "the body is too large", 404: "not found"}


def _http(exc: HTTPException) -> Response:
    response = problem(exc.code or 500, _MESSAGES.get(exc.code, exc.description or exc.name))
    for name, value in exc.get_headers():
        if name.lower() != "content-type":  # e.g. Allow on a 405
            response.headers[name] = value
    return response


def _unavailable(exc: Exception) -> Response:
    log.warning("a store does not answer (%s) [%s]", type(exc).__name__, correlation_id())
    response = problem(503, "a store this service needs does not answer; try again")
    response.headers["Retry-After"] = "5"
    return response


def _unexpected(_exc: Exception) -> Response:
    log.exception("unhandled error on %s %s [%s]", request.method, request.path, correlation_id())
    return problem(500, "internal error; the request id is in the X-Request-Id header")
