"""Dead letters: look at them without consuming them, group them by reason, replay or discard
the ones chosen. The `messaging dlq` command and the operators' console both use this.

Looking reads every message of the dead queue unacknowledged and gives them all back at once
(dead queues have no delivery limit, so looking never consumes or ages one). A replay publishes
the chosen messages to their original queue with a publisher confirm and removes each from the
dead queue only after its confirm, without its failure headers, so it gets a fresh set of
retries; the rest is given back untouched. A choice is a list of ids taken from an earlier look,
so a group action applies to the messages that were listed, never to ones that arrived since.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from .retry import resent_properties

# Headers the failure path adds; a replayed message starts again without them.
FAILURE_HEADERS = (
    "x-death",
    "x-attempts",
    "x-first-failure-at",
    "x-exception-type",
    "x-last-error",
    "x-dead-reason",
    "x-dead-at",
    "x-original-queue",
    "x-delivery-count",  # quorum queues count our looks at the dead queue
)


def dead_queue_name(queue: str) -> str:
    return queue if queue.endswith(".dead") else f"{queue}.dead"


def text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def read_all(channel: BlockingChannel, queue: str) -> list[tuple[Any, Any, bytes]]:
    """Every message of the queue, unacknowledged: the caller acks what it removes and
    `give_back` returns the rest. Reads at most the depth the broker reports when it starts,
    so a busy queue cannot keep it reading forever."""
    depth = channel.queue_declare(queue, passive=True).method.message_count
    messages = []
    for _ in range(depth):
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            break
        messages.append((method, properties, body))
    return messages


def give_back(channel: BlockingChannel) -> None:
    """Return every message read and not acknowledged to its queue, as it was.

    basic.nack with requeue is a plain return (RabbitMQ 4.3 counts only basic.reject toward a
    delivery limit); dead queues are declared without a limit anyway (topology.py).
    """
    if channel.is_open:
        channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)


def dead_reason(headers: dict[str, Any]) -> str:
    """Why a message is dead: our header, else what the broker's own dead-lettering recorded."""
    if "x-dead-reason" in headers:
        return text(headers["x-dead-reason"])
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        reason = text(deaths[0].get("reason", "?"))
        queue = text(deaths[0].get("queue", "?"))
        if reason == "delivery_limit":
            return f"delivery limit: {queue} delivered it too often without it being settled"
        return f"dead-lettered by the broker from {queue}: {reason}"
    return "(no reason recorded)"


_VARYING = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|'[^']*'|\"[^\"]*\"|\d+"
)


def normalised(reason: str) -> str:
    """A reason with what varies from message to message (ids, numbers, quoted values)
    replaced, so that the same failure groups together."""
    return _VARYING.sub("…", reason)[:300]


@dataclass(frozen=True)
class Letter:
    """One dead message as it was looked at."""

    id: str  # its message_id, else a digest of its body and headers
    message_id: str | None
    type: str | None
    headers: dict[str, Any]
    body: bytes
    reason: str
    exception: str
    dead_at: str

    @property
    def group(self) -> str:
        return f"{self.exception}: {normalised(self.reason)}"


def letter_id(properties: Any, body: bytes) -> str:
    if isinstance(properties.message_id, str) and properties.message_id:
        return properties.message_id
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    seed = body + text(headers.get("x-dead-at", "")).encode()
    return f"sha1:{hashlib.sha1(seed).hexdigest()[:16]}"


def look(conn: BlockingConnection, queue: str) -> list[Letter]:
    """Every message of a dead queue, which stays there."""
    queue = dead_queue_name(queue)
    channel = conn.channel()
    try:
        messages = read_all(channel, queue)
        give_back(channel)
    finally:
        if channel.is_open:
            channel.close()
    letters = []
    for _, properties, body in messages:
        headers = dict(properties.headers or {})
        letters.append(
            Letter(
                id=letter_id(properties, body),
                message_id=properties.message_id,
                type=properties.type,
                headers=headers,
                body=body,
                reason=dead_reason(headers),
                exception=text(headers.get("x-exception-type", "Broker")),
                dead_at=text(headers.get("x-dead-at", "")),
            )
        )
    return letters


def replay(conn: BlockingConnection, queue: str, ids: Iterable[str] | None) -> int:
    """Send the chosen dead letters (all, for None) back to their original queue; how many."""
    queue, chosen = dead_queue_name(queue), None if ids is None else set(ids)
    channel = conn.channel()
    channel.confirm_delivery()
    replayed = 0
    try:
        for method, properties, body in read_all(channel, queue):
            if chosen is not None and letter_id(properties, body) not in chosen:
                continue
            headers = dict(properties.headers or {})
            target = text(headers.get("x-original-queue") or queue.removesuffix(".dead"))
            fresh = {k: v for k, v in headers.items() if k not in FAILURE_HEADERS}
            fresh["x-replayed-at"] = datetime.now(UTC).isoformat()
            # Raises if the broker does not confirm: the dead copy is then left where it is.
            channel.basic_publish(
                "", target, body, resent_properties(properties, fresh), mandatory=True
            )
            channel.basic_ack(method.delivery_tag)
            replayed += 1
        give_back(channel)  # what was not chosen stays in the dead queue
    finally:
        if channel.is_open:
            channel.close()
    return replayed


def discard(conn: BlockingConnection, queue: str, ids: Iterable[str]) -> int:
    """Remove the chosen dead letters for good; how many."""
    queue, chosen = dead_queue_name(queue), set(ids)
    channel = conn.channel()
    discarded = 0
    try:
        for method, properties, body in read_all(channel, queue):
            if letter_id(properties, body) in chosen:
                channel.basic_ack(method.delivery_tag)
                discarded += 1
        give_back(channel)
    finally:
        if channel.is_open:
            channel.close()
    return discarded
