"""The operator's command: `messaging dlq ...`, `messaging outbox status`, `messaging replay ...`.

    messaging dlq list <queue>                  dead messages grouped by reason
    messaging dlq show <queue> [--id EVENT_ID]  headers and body
    messaging dlq replay <queue> (--id ID ... | --all)
    messaging dlq purge <queue> --yes
    messaging outbox status                     backlog, oldest unpublished, last publish
    messaging replay --to <queue> [--entity E] [--since ISO]

The broker is AMQP_URL; the producer's database is DATABASE_URL, else PERSON_DATABASE_URL.
`<queue>` may be a dead queue's name or its work queue's (`.dead` is then added).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pika
import psycopg
from pika.adapters.blocking_connection import BlockingChannel

from .connection import amqp_parameters
from .publisher import ConfirmedPublisher, Outgoing, PublishError
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
SHOW_BODY_LIMIT = 4000


def _amqp_url() -> str:
    return os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _database_url() -> str:
    return os.environ.get("DATABASE_URL") or os.environ.get(
        "PERSON_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/person"
    )


def dead_queue_name(queue: str) -> str:
    return queue if queue.endswith(".dead") else f"{queue}.dead"


@contextmanager
def _channel() -> Iterator[BlockingChannel]:
    conn = pika.BlockingConnection(amqp_parameters(_amqp_url(), "messaging-cli"))
    try:
        yield conn.channel()
    finally:
        if conn.is_open:
            conn.close()


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def read_all(channel: BlockingChannel, queue: str) -> list[tuple[Any, Any, bytes]]:
    """Every message of the queue, unacknowledged: they go back when the channel closes.

    Reads at most the depth the broker reports when it starts, so a busy queue cannot keep it
    reading forever.
    """
    depth = channel.queue_declare(queue, passive=True).method.message_count
    messages = []
    for _ in range(depth):
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            break
        messages.append((method, properties, body))
    return messages


def _headers(properties: Any) -> dict[str, Any]:
    return dict(properties.headers or {})


def dlq_list(queue: str) -> int:
    queue = dead_queue_name(queue)
    with _channel() as channel:
        messages = read_all(channel, queue)
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for _, properties, _ in messages:
        headers = _headers(properties)
        reason = _text(headers.get("x-dead-reason", "(no reason recorded)"))
        groups[reason].append(_text(headers.get("x-dead-at", "")))
    print(f"{queue}: {len(messages)} dead message(s)")
    for reason, times in sorted(groups.items(), key=lambda item: -len(item[1])):
        known = sorted(t for t in times if t)
        span = f"  oldest {known[0]}  newest {known[-1]}" if known else ""
        print(f"{len(times):6d}  {reason}{span}")
    return 0


def dlq_show(queue: str, event_id: str | None) -> int:
    queue = dead_queue_name(queue)
    with _channel() as channel:
        messages = read_all(channel, queue)
    shown = 0
    for _, properties, body in messages:
        if event_id is not None and properties.message_id != event_id:
            continue
        shown += 1
        print(f"--- message_id: {properties.message_id}  type: {properties.type}")
        for name, value in sorted(_headers(properties).items()):
            if name != "x-death":
                print(f"{name}: {_text(value)}")
        try:
            text = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        except ValueError:
            text = repr(body[:SHOW_BODY_LIMIT])
        if len(text) > SHOW_BODY_LIMIT:
            text = f"{text[:SHOW_BODY_LIMIT]}\n... ({len(body)} bytes in all)"
        print(text)
    if event_id is not None and not shown:
        print(f"no message {event_id} in {queue}", file=sys.stderr)
        return 1
    return 0


def dlq_replay(queue: str, ids: list[str] | None) -> int:
    """Republish to the original queue with a confirm, then remove from the dead queue."""
    queue = dead_queue_name(queue)
    conn = pika.BlockingConnection(amqp_parameters(_amqp_url(), "messaging-cli"))
    replayed = 0
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for method, properties, body in read_all(channel, queue):
            if ids is not None and properties.message_id not in ids:
                continue
            headers = _headers(properties)
            target = _text(headers.get("x-original-queue") or queue.removesuffix(".dead"))
            fresh = {k: v for k, v in headers.items() if k not in FAILURE_HEADERS}
            fresh["x-replayed-at"] = datetime.now(UTC).isoformat()
            # Raises if the broker does not confirm: the dead copy is then left where it is.
            channel.basic_publish(
                "",
                target,
                body,
                resent_properties(properties, fresh),
                mandatory=True,
            )
            channel.basic_ack(method.delivery_tag)
            replayed += 1
    finally:
        if conn.is_open:
            conn.close()  # what was not replayed goes back to the dead queue
    print(f"replayed {replayed} message(s) from {queue}")
    return 0 if replayed or ids is None else 1


def dlq_purge(queue: str) -> int:
    queue = dead_queue_name(queue)
    with _channel() as channel:
        count = channel.queue_purge(queue).method.message_count
    print(f"purged {count} message(s) from {queue}")
    return 0


def outbox_status() -> int:
    with psycopg.connect(_database_url(), connect_timeout=5) as conn:
        backlog, oldest = conn.execute(
            "SELECT count(*), min(occurred_at) FROM messaging_outbox WHERE published_at IS NULL"
        ).fetchone()
        (last,) = conn.execute("SELECT max(published_at) FROM messaging_outbox").fetchone()
    now = datetime.now(UTC)
    print(f"unpublished: {backlog}")
    age = f"{(now - oldest).total_seconds():.1f}s ({oldest.isoformat()})" if oldest else "-"
    print(f"oldest unpublished: {age}")
    print(f"last published: {last.isoformat() if last else 'never'}")
    return 0


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


def replay(queue: str, entity: str | None, since: datetime | None) -> int:
    """Publish the producer's events straight to one subscriber's queue, with pipelined
    confirms: it returns once the broker confirmed every one of them.

    Without --since: the latest event of every entity (deletions included), enough to rebuild a
    read model; with it, every event since then. Consumers apply by version, so events they
    already hold and live traffic arriving meanwhile are harmless.
    """
    sql, params = (
        (SINCE_SQL, {"since": since, "entity": entity})
        if since
        else (
            LATEST_SQL,
            {"entity": entity},
        )
    )
    with _channel() as channel:
        channel.queue_declare(queue, passive=True)  # a typo must not publish into the void
    replayed_at = datetime.now(UTC).isoformat()
    publisher = ConfirmedPublisher(_amqp_url(), "", "messaging-cli")
    with psycopg.connect(_database_url()) as db, db.cursor(name="replay") as cursor:
        cursor.itersize = 2000
        cursor.execute(sql, params)
        messages = (
            Outgoing(
                queue,
                body.encode(),
                pika.BasicProperties(
                    message_id=event_id,
                    type=event_type,
                    correlation_id=correlation_id,
                    content_type="application/json",
                    delivery_mode=pika.DeliveryMode.Persistent,
                    headers={"x-replayed-at": replayed_at},
                ),
            )
            for body, event_id, event_type, correlation_id in cursor
        )
        try:
            done = publisher.publish_all(messages)
        except PublishError as exc:
            print(f"messaging: replay interrupted: {exc}; run it again", file=sys.stderr)
            return 1
    print(f"replayed {done.confirmed} event(s) to {queue}")
    return 0


def _since(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="messaging", description=__doc__.split("\n", 1)[0])
    commands = top.add_subparsers(dest="command", required=True)

    dlq = commands.add_parser("dlq", help="inspect, replay or purge a dead-letter queue")
    dlq_commands = dlq.add_subparsers(dest="action", required=True)
    listing = dlq_commands.add_parser("list", help="dead messages grouped by reason")
    listing.add_argument("queue")
    show = dlq_commands.add_parser("show", help="headers and bodies")
    show.add_argument("queue")
    show.add_argument("--id", dest="event_id")
    again = dlq_commands.add_parser("replay", help="send back to the original queue")
    again.add_argument("queue")
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="ids", action="append", metavar="EVENT_ID")
    which.add_argument("--all", action="store_true")
    purge = dlq_commands.add_parser("purge", help="delete every dead message")
    purge.add_argument("queue")
    purge.add_argument("--yes", action="store_true", required=True, help="yes, delete them")

    outbox = commands.add_parser("outbox", help="the producer's outbox")
    outbox.add_argument("action", choices=["status"])

    rebuild = commands.add_parser("replay", help="publish the producer's events to one queue")
    rebuild.add_argument("--to", required=True, dest="queue")
    rebuild.add_argument("--entity")
    rebuild.add_argument("--since", type=_since, help="ISO time: every event since then")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "dlq":
            if args.action == "list":
                return dlq_list(args.queue)
            if args.action == "show":
                return dlq_show(args.queue, args.event_id)
            if args.action == "replay":
                return dlq_replay(args.queue, None if args.all else args.ids)
            return dlq_purge(args.queue)
        if args.command == "outbox":
            return outbox_status()
        return replay(args.queue, args.entity, args.since)
    except pika.exceptions.ChannelClosedByBroker as exc:
        print(f"messaging: the broker refused: {exc.reply_text}", file=sys.stderr)
        return 2
    except (pika.exceptions.AMQPConnectionError, psycopg.OperationalError) as exc:
        print(f"messaging: cannot connect: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
