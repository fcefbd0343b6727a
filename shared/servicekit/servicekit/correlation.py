"""A correlation id per request: the client's `X-Request-Id` when it has the kept shape, a
generated one otherwise; on every log line of the request, in the answer, and in the events the
request causes (their `correlation_id`)."""

from __future__ import annotations

import re
import uuid

from flask import Flask, Response, g, request

from . import logs

REQUEST_ID_HEADER = "X-Request-Id"
# A client's request id is kept only in this shape: it becomes the events' correlation id, an
# AMQP short string, and shows in logs; anything else is replaced by a generated one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def correlation_id() -> str:
    return g.get("correlation_id") or "-"


def init_app(app: Flask) -> None:
    app.before_request(_bind)
    app.after_request(_echo)
    app.teardown_request(_unbind)


def _bind() -> None:
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    g.correlation_id = incoming if _REQUEST_ID.fullmatch(incoming) else str(uuid.uuid4())
    g.log_binding = logs.correlation_id.set(g.correlation_id)  # on every log line


def _echo(response: Response) -> Response:
    response.headers[REQUEST_ID_HEADER] = correlation_id()
    return response


def _unbind(_exc: BaseException | None) -> None:
    if "log_binding" in g:
        logs.correlation_id.reset(g.log_binding)
