"""JSON log lines carrying the correlation id of the change they are about.

The id travels from the HTTP request (X-Request-Id) into the envelope (`correlation_id`) and from
there into every consumer log line about that change: `bound(cid)` sets it for the code it wraps,
and every record logged meanwhile carries it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)


@contextmanager
def bound(value: str | None) -> Iterator[None]:
    token = correlation_id.set(value)
    try:
        yield
    finally:
        correlation_id.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, correlation_id, error."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        cid = getattr(record, "correlation_id", None) or correlation_id.get()
        if cid:
            line["correlation_id"] = cid
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def handler(fmt: str = "json") -> logging.Handler:
    """A stderr handler in the given format ("json", or "text" for people at a terminal)."""
    out = logging.StreamHandler()
    if fmt == "text":
        out.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        out.setFormatter(JsonFormatter())
    return out
