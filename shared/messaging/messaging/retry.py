"""Where a failed message goes next: a retry queue or the dead queue, and with which headers.

Retries are data: the topology's tuple of delays. Attempts are counted from the broker's
`x-death` header (one entry per retry queue the message expired from), with our own
`x-attempts` header as a fallback for brokers that do not keep client-visible x-death.

Headers come from whoever published the message, so nothing here trusts their shape: a header
that cannot be read makes the message unjudgeable, and an unjudgeable message goes to the dead
queue with the reason. `decide` never raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika

from .topology import Topology

MAX_REASON = 1000
# More than this is not a count a broker wrote: reading it as one would only hide the message.
MAX_COUNT = 1_000_000


@dataclass(frozen=True)
class Decision:
    queue: str
    dead: bool
    headers: dict[str, Any]


class UnreadableHeaders(ValueError):
    """A header the failure path relies on has a shape no broker writes."""


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise UnreadableHeaders(f"{name} is {_shown(value)}, not a count")
    return value


def failed_attempts(topology: Topology, headers: Any) -> int:
    """How many times this message already failed and went through a retry queue.

    Raises UnreadableHeaders when x-death or x-attempts has a shape no broker writes.
    """
    if headers is None:
        return 0
    if not isinstance(headers, dict):
        raise UnreadableHeaders(f"the headers are {_shown(headers)}, not a table")
    deaths = headers.get("x-death")
    if deaths is None:
        deaths = []
    if not isinstance(deaths, list):
        raise UnreadableHeaders(f"x-death is {_shown(deaths)}, not a list of tables")
    retry_queues = set(topology.retry_queues)
    from_x_death = 0
    for entry in deaths:
        if not isinstance(entry, dict):
            raise UnreadableHeaders(f"an x-death entry is {_shown(entry)}, not a table")
        if _text(entry.get("queue")) in retry_queues:
            from_x_death += _count(entry.get("count", 1), "an x-death count")
    own = headers.get("x-attempts")
    return max(from_x_death, 0 if own is None else _count(own, "x-attempts"))


def decide(
    topology: Topology, properties: Any, exc: BaseException, *, permanent: bool = False
) -> Decision:
    """Choose the next queue for a message whose handling raised `exc`; never raises."""
    try:
        return _decide(topology, properties, exc, permanent)
    except Exception as problem:  # the message cannot be judged: dead, with both reasons
        return dead_letter(topology, f"cannot judge the message ({problem}); it failed with", exc)


def dead_letter(topology: Topology, why: str, exc: BaseException | None = None) -> Decision:
    """A decision to dead-letter at once, reading nothing from the message."""
    now = datetime.now(UTC).isoformat()
    reason = why if exc is None else f"{why} {_reason(exc)}"
    reason = reason[:MAX_REASON]
    return Decision(
        topology.dead_queue,
        True,
        {
            "x-attempts": 1,
            "x-first-failure-at": now,
            "x-exception-type": type(exc).__name__ if exc is not None else "Unjudgeable",
            "x-last-error": reason,
            "x-dead-reason": reason,
            "x-dead-at": now,
            "x-original-queue": topology.queue,
        },
    )


def _decide(topology: Topology, properties: Any, exc: BaseException, permanent: bool) -> Decision:
    headers = getattr(properties, "headers", None)
    previous = failed_attempts(topology, headers)
    headers = headers or {}
    attempts = previous + 1
    reason = _reason(exc)
    now = datetime.now(UTC).isoformat()
    first = headers.get("x-first-failure-at")
    common = {
        "x-attempts": attempts,
        "x-first-failure-at": (_text(first) or now)[:64],
        "x-exception-type": type(exc).__name__,
        "x-last-error": reason,
    }
    if permanent or previous >= len(topology.retry_delays):
        why = reason if permanent else f"retries exhausted after {attempts} attempts: {reason}"
        return Decision(
            topology.dead_queue,
            True,
            {
                **common,
                "x-dead-reason": why[:MAX_REASON],
                "x-dead-at": now,
                "x-original-queue": topology.queue,
            },
        )
    return Decision(topology.retry_queue(previous), False, common)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_REASON]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def resent_properties(properties: Any, headers: dict[str, Any]) -> pika.BasicProperties:
    """The properties of a message sent again (to a retry or dead queue, or back from the dead
    queue): the original's identity and type, persistent, with these headers."""
    return pika.BasicProperties(
        message_id=_property(properties, "message_id"),
        type=_property(properties, "type"),
        correlation_id=_property(properties, "correlation_id"),
        content_type=_property(properties, "content_type"),
        delivery_mode=pika.DeliveryMode.Persistent,
        headers=headers,
    )


def _property(properties: Any, name: str) -> str | None:
    value = getattr(properties, name, None)
    return value if isinstance(value, str) else None
