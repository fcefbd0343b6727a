"""Replaying the producer's events to one subscriber's queue, on request or by hand.

The producer owns the log (the outbox keeps the latest event of every entity forever), so a read
model that lost its store, or a new one, asks the producer through the broker: it publishes a
request to `<exchange>.replay-requests` naming its queue, and the producer side (the relay
process runs a `ReplayServer`) publishes the latest event of every entity straight to that queue
with pipelined confirms, then a `messaging.replay-completed` message carrying the request's id.
The consumer runtime hands that message to the read model's `Healing` (healing.py) instead of
its handler. Consumers apply by version, so events they already hold and live traffic arriving
meanwhile are harmless. `messaging replay --to` (cli.py) runs the same replay by hand.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pika
import psycopg

from .connection import Backoff, StopFlag, amqp_parameters, connect
from .publisher import ConfirmedPublisher, Outgoing, event_properties

log = logging.getLogger("messaging.replay")

COMPLETED_TYPE = "messaging.replay-completed"
REQUEST_TYPE = "messaging.replay-requested"
MAX_REQUEST_BYTES = 4096
REQUEST_HEADER = "x-replay-request"  # the request a replayed event or completion answers

LATEST_SQL = """
SELECT body, event_id::text, event_type, correlation_id FROM (
    SELECT DISTINCT ON (entity, entity_id) id, body, event_id, event_type, correlation_id
    FROM messaging_outbox
    WHERE %(entity)s::text IS NULL OR entity = %(entity)s
    ORDER BY entity, entity_id, entity_version DESC
) latest ORDER BY id
"""
SINCE_SQL = """
SELECT body, event_id::text, event_type, correlation_id FROM messaging_outbox
WHERE occurred_at >= %(since)s AND (%(entity)s::text IS NULL OR entity = %(entity)s)
ORDER BY id
"""


def requests_queue(exchange: str) -> str:
    """The queue the producer takes replay requests from."""
    return f"{exchange}.replay-requests"


def declare_requests(channel: Any, exchange: str) -> str:
    queue = requests_queue(exchange)
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    return queue


def request_replay(amqp_url: str, exchange: str, queue: str, request_id: str) -> None:
    """Ask the producer to replay every entity's latest event to `queue` (confirmed)."""
    conn = connect(amqp_url, "replay-request")
    try:
        channel = conn.channel()
        target = declare_requests(channel, exchange)
        channel.confirm_delivery()
        channel.basic_publish(
            "",
            target,
            json.dumps({"queue": queue, "request_id": request_id}).encode(),
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
    since: datetime | None = None,
    request_id: str | None = None,
) -> int:
    """Publish the producer's events to `queue` with confirms; return how many.

    Without `since`: the latest event of every entity (deletions included), enough to rebuild
    a read model; with it, every event since then. With `request_id`, every event carries it
    in `x-replay-request` (so a consumer can count the applies a replay caused) and a completion
    message follows the events. Raises publisher.PublishError if the broker did not confirm
    them all.
    """
    sql, params = (
        (SINCE_SQL, {"since": since, "entity": entity})
        if since
        else (
            LATEST_SQL,
            {"entity": entity},
        )
    )
    headers = {"x-replayed-at": datetime.now(UTC).isoformat()}
    if request_id is not None:
        headers[REQUEST_HEADER] = request_id
    publisher = ConfirmedPublisher(amqp_url, "", "messaging-replay")
    with psycopg.connect(database_url) as db, db.cursor(name="replay") as cursor:
        cursor.itersize = 2000
        cursor.execute(sql, params)
        messages: Iterator[Outgoing] = (
            Outgoing(queue, body.encode(), event_properties(event_id, event_type, cid, headers))
            for body, event_id, event_type, cid in cursor
        )
        done = publisher.publish_all(messages)
    if request_id is not None:
        completed = Outgoing(
            queue,
            json.dumps({"request_id": request_id, "events": done.confirmed}).encode(),
            pika.BasicProperties(
                type=COMPLETED_TYPE,
                message_id=f"{request_id}:completed",
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                headers={REQUEST_HEADER: request_id},
            ),
        )
        publisher.publish_all([completed])
    return done.confirmed


def completed_request(properties: Any, body: bytes) -> str | None:
    """The request id of a replay-completed message; None for any other message."""
    if getattr(properties, "type", None) != COMPLETED_TYPE:
        return None
    try:
        request_id = json.loads(body)["request_id"]
    except (ValueError, TypeError, KeyError):
        return ""
    return request_id if isinstance(request_id, str) else ""


class ReplayServer:
    """Serves replay requests until stop(): the producer side of self-healing read models.

    A request is acknowledged only after its replay and completion message were confirmed, so
    a server that dies mid-replay replays again (harmless). A request naming a queue that does
    not exist, or that is not a request at all, is acknowledged and logged, never retried.
    """

    def __init__(self, database_url: str, amqp_url: str, exchange: str) -> None:
        self.database_url, self.amqp_url, self.exchange = database_url, amqp_url, exchange
        self._stop = StopFlag()
        self.served = 0

    def stop(self) -> None:
        self._stop.set()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="replay-server", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                self._session()
                backoff.reset()
            except Exception as exc:  # the broker or the database went away: start over
                delay = backoff.next()
                log.warning(
                    "replay server interrupted (%s: %s); again in %.1fs",
                    type(exc).__name__,
                    exc,
                    delay,
                )
                self._stop.wait(delay)

    def _session(self) -> None:
        params = amqp_parameters(self.amqp_url, "replay-server")
        conn = pika.BlockingConnection(params)
        try:
            channel = conn.channel()
            queue = declare_requests(channel, self.exchange)
            channel.basic_qos(prefetch_count=1)
            for method, _properties, body in channel.consume(queue, inactivity_timeout=0.5):
                if self._stop.is_set():
                    break
                if method is None:
                    continue
                self._serve(conn, body)
                channel.basic_ack(method.delivery_tag)
        finally:
            if conn.is_open:
                conn.close()

    def _serve(self, conn: pika.BlockingConnection, body: bytes) -> None:
        try:
            request = json.loads(body) if len(body) <= MAX_REQUEST_BYTES else None
            queue, request_id = request["queue"], request["request_id"]
            if not (isinstance(queue, str) and isinstance(request_id, str) and queue):
                raise TypeError("queue and request_id must be text")
        except (ValueError, TypeError, KeyError) as exc:
            log.error("dropped a replay request that is not one (%s): %r", exc, body[:200])
            return
        probe = conn.channel()
        try:
            probe.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            log.error("dropped a replay request for queue %s, which does not exist", queue)
            return
        if probe.is_open:
            probe.close()
        log.info("replaying to %s for request %s", queue, request_id)
        # The replay publishes on a connection of its own, for as long as it takes; this one
        # keeps answering heartbeats meanwhile, or the broker would hand the request to
        # another server (or back to this one) before it is acknowledged.
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["events"] = replay(
                    self.database_url, self.amqp_url, queue, request_id=request_id
                )
            except Exception as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="replay", daemon=True)
        worker.start()
        while worker.is_alive():
            conn.process_data_events(time_limit=0.5)
        if "error" in outcome:
            raise outcome["error"]
        self.served += 1
        log.info("replayed %d event(s) to %s for request %s", outcome["events"], queue, request_id)
