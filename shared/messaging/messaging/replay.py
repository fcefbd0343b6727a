"""Replaying the producer's events to one subscriber's queue, on request or by hand.

The producer owns the log (the outbox keeps the latest event of every entity forever), so a read
model that lost its store, or a new one, asks the producer through the broker: it publishes a
request to `<exchange>.replay-requests` naming its queue, and the producer side (the relay
process runs a `ReplayServer`) publishes the latest event of every entity straight to that queue
with pipelined confirms, then a `messaging.replay-completed` message carrying the request's id.
The consumer runtime hands that message to the read model's `Healing` (healing.py) instead of
its handler. Consumers apply by version, so events they already hold and live traffic arriving
meanwhile are harmless. `messaging replay --to` (cli.py) runs the same replay by hand.

This module holds the replay and the request's wire format; replay_server.py serves requests.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
import psycopg
from pika.adapters.blocking_connection import BlockingConnection
from pika.exceptions import ChannelClosedByBroker

from . import digests
from .connection import connect
from .envelope import MAX_BODY_BYTES
from .publisher import ConfirmedPublisher, Outgoing, event_properties, unpublishable

log = logging.getLogger("messaging.replay")

COMPLETED_TYPE = "messaging.replay-completed"
REQUEST_TYPE = "messaging.replay-requested"
MAX_REQUEST_BYTES = 4096
REQUEST_HEADER = "x-replay-request"  # the request a replayed event or completion answers
# A request id is a name, not data: it becomes a message id and a header, which have limits.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_QUEUE_NAME = 255  # AMQP's short string
REPLY_QUEUE_PREFIX = "amq.gen-"  # the names the broker gives the queues it names
# Deliveries of one request before the broker drops it: a request whose reader cannot even
# decode it (a header value out of its client library's range) ends the reader's connection
# before it can be acknowledged, and would otherwise come back forever.
REQUEST_DELIVERY_LIMIT = 5
_PRECONDITION_FAILED, _NOT_FOUND = 406, 404

LATEST_SQL = """
SELECT body, event_id::text, event_type, correlation_id FROM (
    SELECT DISTINCT ON (entity, entity_id) id, body, event_id, event_type, correlation_id
    FROM messaging_outbox
    WHERE (%(entity)s::text IS NULL OR entity = %(entity)s) AND parked_at IS NULL
    ORDER BY entity, entity_id, entity_version DESC
) latest ORDER BY id
"""
# Every event after a position (outbox.position): ids are only compared with one the outbox
# gave out while no write was open, so none committed later is below it.
AFTER_SQL = """
SELECT body, event_id::text, event_type, correlation_id FROM messaging_outbox
WHERE id > %(after)s AND (%(entity)s::text IS NULL OR entity = %(entity)s)
AND parked_at IS NULL
ORDER BY id
"""
# Every event published since a time on the database's clock (or not published yet). Not
# occurred_at: that is the writer's clock, before its commit, so a transaction open at the
# time, or a writer whose clock is behind, would be missed; a row is published only after it
# committed, and published_at is the database's now() then.
SINCE_SQL = """
SELECT body, event_id::text, event_type, correlation_id FROM messaging_outbox
WHERE (published_at >= %(since)s OR published_at IS NULL) AND parked_at IS NULL
AND (%(entity)s::text IS NULL OR entity = %(entity)s)
ORDER BY id
"""


# The newest published event of the entities of some buckets (a verification's repair): what
# the producer's digests count (messaging_published), found through its index.
BUCKETS_SQL = """
SELECT o.body, o.event_id::text, o.event_type, o.correlation_id
FROM messaging_published p
JOIN unnest(%(entities)s::text[], %(buckets)s::int[]) AS w(entity, bucket)
  ON p.entity = w.entity AND p.bucket = w.bucket
JOIN messaging_outbox o
  ON o.entity = p.entity AND o.entity_id = p.entity_id AND o.entity_version = p.version
ORDER BY o.id
"""


def requests_queue(exchange: str) -> str:
    """The queue the producer takes replay requests from."""
    return f"{exchange}.replay-requests"


def declare_requests(conn: BlockingConnection, exchange: str) -> str:
    """Declare the queue of replay requests (idempotently) and return its name.

    A queue that exists is used as it is, looked up passively, which needs no permission: the
    relay's broker role declares it, a consumer's only publishes to it (permissions.py). One an
    older version declared without the delivery limit is used as it is too: requests work, the
    guard comes when it is deleted and declared again with no request waiting.
    """
    queue = requests_queue(exchange)
    arguments = {"x-queue-type": "quorum", "x-delivery-limit": REQUEST_DELIVERY_LIMIT}
    channel = conn.channel()
    try:  # there already: no permission needed (a consumer's role may not configure it)
        channel.queue_declare(queue, passive=True)
        channel.close()
        return queue
    except ChannelClosedByBroker as exc:
        if exc.reply_code != _NOT_FOUND:
            raise
    channel = conn.channel()
    try:
        channel.queue_declare(queue, durable=True, arguments=arguments)
    except ChannelClosedByBroker as exc:
        if exc.reply_code != _PRECONDITION_FAILED:
            raise
        log.warning("%s was declared without a delivery limit; using it as it is", queue)
        channel = conn.channel()
        channel.queue_declare(queue, passive=True)
    finally:
        if channel.is_open:
            channel.close()
    return queue


# What a request asks for: the latest event of every entity (a latest-state model heals from
# it); every event the outbox still holds, in order (a model that accumulates rebuilds from it:
# the outbox keeps each entity's older events for the relay's retention, 7 days by default); the
# latest event of the entities of some buckets (a verification's repair); or no events, the
# producer's digests (a verification, verification.py).
LATEST, HISTORY, BUCKETS, DIGESTS = "latest", "history", "buckets", "digests"
SCOPES = (LATEST, HISTORY, BUCKETS, DIGESTS)
DIGESTS_TYPE = "messaging.digests"  # the producer's answer to a DIGESTS request


@dataclass(frozen=True)
class Request:
    """A replay request: `scope` to `queue`, then complete `request_id`."""

    queue: str
    request_id: str
    scope: str = LATEST
    buckets: tuple[tuple[str, tuple[int, ...]], ...] = ()  # BUCKETS: (entity, buckets) pairs
    reply_to: str | None = None  # DIGESTS: a queue the model's report goes to as well

    @property
    def key(self) -> tuple:
        """Requests with the same key are answered by one replay."""
        return (self.queue, self.scope, self.buckets)


class NotARequest(ValueError):
    """A message on the requests queue that is not a replay request; says why."""


def parse_request(body: bytes) -> Request:
    """The request a message body carries; NotARequest, saying why, for anything else."""
    if len(body) > MAX_REQUEST_BYTES:
        raise NotARequest(
            f"a body of {len(body)} bytes (a request has at most {MAX_REQUEST_BYTES})"
        )
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise NotARequest(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(request, dict):
        raise NotARequest(f"JSON {type(request).__name__}, not an object")
    queue, request_id = request.get("queue"), request.get("request_id")
    if not (isinstance(queue, str) and 0 < len(queue.encode(errors="replace")) <= MAX_QUEUE_NAME):
        raise NotARequest("`queue` is not a queue name")
    if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
        raise NotARequest("`request_id` is not 1 to 128 of A-Z a-z 0-9 . _ : -")
    scope = request.get("scope", LATEST)
    if scope not in SCOPES:
        raise NotARequest(f"`scope` is not one of {', '.join(SCOPES)}")
    buckets = _buckets(request.get("buckets")) if scope == BUCKETS else ()
    reply_to = request.get("reply_to")
    if reply_to is not None and not (
        isinstance(reply_to, str)
        and reply_to.startswith(REPLY_QUEUE_PREFIX)
        and len(reply_to.encode(errors="replace")) <= MAX_QUEUE_NAME
    ):
        # Only a queue the broker named for a client (exclusive to `messaging verify`): a
        # request must not make a read model publish into any other queue.
        raise NotARequest(f"`reply_to` is not a broker-named queue ({REPLY_QUEUE_PREFIX}...)")
    return Request(queue, request_id, scope, buckets, reply_to)


def _buckets(raw: object) -> tuple[tuple[str, tuple[int, ...]], ...]:
    if not isinstance(raw, dict) or not raw:
        raise NotARequest("`buckets` is not an object of entity -> bucket numbers")
    out = []
    for entity, numbers in sorted(raw.items()):
        if not (isinstance(entity, str) and isinstance(numbers, list) and numbers):
            raise NotARequest("`buckets` is not an object of entity -> bucket numbers")
        if not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1024 for n in numbers
        ):
            raise NotARequest("a bucket number is not 0 to 1023")
        out.append((entity, tuple(sorted(set(numbers)))))
    return tuple(out)


def request_replay(
    amqp_url: str,
    exchange: str,
    queue: str,
    request_id: str,
    scope: str = LATEST,
    *,
    buckets: dict[str, list[int]] | None = None,
    reply_to: str | None = None,
) -> None:
    """Ask the producer (confirmed) for `scope` to `queue`: every entity's latest event, every
    event the outbox still holds (HISTORY), the latest events of some buckets (BUCKETS), or its
    digests (DIGESTS)."""
    body: dict[str, Any] = {"queue": queue, "request_id": request_id, "scope": scope}
    if buckets is not None:
        body["buckets"] = buckets
    if reply_to is not None:
        body["reply_to"] = reply_to
    conn = connect(amqp_url, "replay-request")
    try:
        target = declare_requests(conn, exchange)
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "",
            target,
            json.dumps(body).encode(),
            pika.BasicProperties(
                type=REQUEST_TYPE,
                message_id=request_id,
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
            ),
            mandatory=True,
        )
    finally:
        if conn.is_open:
            conn.close()


def replay(
    database_url: str,
    amqp_url: str,
    queue: str,
    *,
    entity: str | None = None,
    after_id: int | None = None,
    since: datetime | None = None,
    request_id: str | None = None,
    also_completes: Collection[str] = (),
    buckets: Collection[tuple[str, Collection[int]]] = (),
) -> int:
    """Publish the producer's events to `queue` with confirms; return how many.

    By default the latest event of every entity (deletions included), enough to rebuild a read
    model; with `after_id`, every event after that outbox position (outbox.position); with
    `since`, every event the relay published since then (the database's clock) or has not yet
    published. With `request_id`, every event carries it
    in `x-replay-request` (so a consumer can count the applies a replay caused) and a completion
    message follows the events, and one for each of `also_completes` (requests this one replay
    answers too). Raises publisher.PublishError if the broker did not confirm them all.
    """
    if after_id is not None and since is not None:
        raise ValueError("replay after a position or since a time, not both")
    if buckets:
        pairs = [(entity, b) for entity, numbers in buckets for b in numbers]
        sql, params = (
            BUCKETS_SQL,
            {"entities": [e for e, _ in pairs], "buckets": [b for _, b in pairs]},
        )
    elif after_id is not None:
        sql, params = AFTER_SQL, {"after": after_id, "entity": entity}
    elif since is not None:
        sql, params = SINCE_SQL, {"since": since, "entity": entity}
    else:
        sql, params = LATEST_SQL, {"entity": entity}
    headers = {"x-replayed-at": datetime.now(UTC).isoformat()}
    if request_id is not None:
        headers[REQUEST_HEADER] = request_id
    publisher = ConfirmedPublisher(amqp_url, "", "messaging-replay")
    with psycopg.connect(database_url) as db, db.cursor(name="replay") as cursor:
        cursor.itersize = 2000
        cursor.execute(sql, params)
        done = publisher.publish_all(_publishable(cursor, queue, headers))
    if request_id is not None:
        answered = dict.fromkeys([*also_completes, request_id])  # once each, in order
        publisher.publish_all([completion(queue, rid, done.confirmed) for rid in answered])
    return done.confirmed


def _publishable(rows: Iterable[tuple], queue: str, headers: dict[str, Any]) -> Iterator[Outgoing]:
    """The rows as messages, skipping (and saying so) any the broker could not take as it is:
    the relay parks such a row, and one row must not fail a whole replay. (Parked rows are not
    replayed: the latest published state of their entity is.)"""
    for body, event_id, event_type, cid in rows:
        message = Outgoing(
            queue, body.encode(), event_properties(event_id, event_type, cid, headers)
        )
        why = unpublishable(message.body, message.properties, MAX_BODY_BYTES)
        if why is not None:
            log.error("replay skipped event %s: %s", event_id, why)
            continue
        yield message


def send_digests(
    database_url: str, amqp_url: str, queue: str, request_ids: list[str], reply_to: list[str]
) -> None:
    """Publish the producer's digests (outbox.digests) to a read model's queue, for these
    verification requests (verification.py), confirmed."""
    from . import outbox

    with psycopg.connect(database_url) as db:
        found = outbox.digests(db)
    message = Outgoing(
        queue,
        digests.answer(found, request_ids, reply_to),
        pika.BasicProperties(
            type=DIGESTS_TYPE,
            message_id=f"{request_ids[-1]}:digests",
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
        ),
    )
    ConfirmedPublisher(amqp_url, "", "messaging-verify").publish_all([message])


def completion(queue: str, request_id: str, events: int) -> Outgoing:
    """The message that tells a read model its requested replay is complete."""
    return Outgoing(
        queue,
        json.dumps({"request_id": request_id, "events": events}).encode(),
        pika.BasicProperties(
            type=COMPLETED_TYPE,
            message_id=f"{request_id}:completed",
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            headers={REQUEST_HEADER: request_id},
        ),
    )
