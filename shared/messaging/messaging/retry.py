"""Where a failed message goes next: a retry queue or the dead queue, and with which headers.

Retries are data: the topology's tuple of delays. Attempts are counted from the broker's
`x-death` header (one entry per retry queue the message expired from), with our own
`x-attempts` header as a fallback for brokers that do not keep client-visible x-death.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika

from .topology import Topology

MAX_REASON = 1000


@dataclass(frozen=True)
class Decision:
    queue: str
    dead: bool
    headers: dict[str, Any]


def failed_attempts(topology: Topology, headers: dict[str, Any] | None) -> int:
    """How many times this message already failed and went through a retry queue."""
    headers = headers or {}
    retry_queues = set(topology.retry_queues)
    from_x_death = sum(
        int(entry.get("count", 1))
        for entry in headers.get("x-death") or []
        if isinstance(entry, dict) and _text(entry.get("queue")) in retry_queues
    )
    own = headers.get("x-attempts")
    return max(from_x_death, int(own) if isinstance(own, int) else 0)


def decide(
    topology: Topology, properties: Any, exc: BaseException, *, permanent: bool = False
) -> Decision:
    """Choose the next queue for a message whose handling raised `exc`."""
    headers = dict(getattr(properties, "headers", None) or {})
    previous = failed_attempts(topology, headers)
    attempts = previous + 1
    reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON]
    now = datetime.now(UTC).isoformat()
    common = {
        "x-attempts": attempts,
        "x-first-failure-at": _text(headers.get("x-first-failure-at")) or now,
        "x-exception-type": type(exc).__name__,
        "x-last-error": reason,
    }
    if permanent or previous >= len(topology.retry_delays):
        why = reason if permanent else f"retries exhausted after {attempts} attempts: {reason}"
        return Decision(
            topology.dead_queue,
            True,
            {**common, "x-dead-reason": why, "x-dead-at": now, "x-original-queue": topology.queue},
        )
    return Decision(topology.retry_queue(previous), False, common)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def resent_properties(properties: Any, headers: dict[str, Any]) -> pika.BasicProperties:
    """The properties of a message sent again (to a retry or dead queue, or back from the dead
    queue): the original's identity and type, persistent, with these headers."""
    return pika.BasicProperties(
        message_id=properties.message_id,
        type=properties.type,
        correlation_id=properties.correlation_id,
        content_type=properties.content_type,
        delivery_mode=pika.DeliveryMode.Persistent,
        headers=headers,
    )
