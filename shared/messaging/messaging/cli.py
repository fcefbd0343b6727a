"""The operator's command: `messaging dlq ...`, `messaging outbox status`, `messaging replay ...`.

    messaging dlq list <queue>                  dead messages grouped by reason
    messaging dlq show <queue> [--id EVENT_ID]  headers and body
    messaging dlq replay <queue> (--id ID ... | --all)
    messaging dlq purge <queue> --yes
    messaging outbox status                     backlog, oldest unpublished, last publish, and the
                                                rows the relay parked, each with its reason
    messaging outbox retry (ID ... | --all)     give parked rows back to the relay (after a fix)
    messaging replay --to <queue> [--entity E] [--since ISO]
    messaging apikey new --scopes a,b           a fresh API key and its API_KEYS entry

The broker is AMQP_URL (one node, or several of a cluster, comma-separated); the producer's
database is DATABASE_URL (or --database-url). `<queue>` may be a dead queue's name or its work
queue's (`.dead` is then added). Listing and showing never consume a dead letter: the messages
are read and returned at once, and dead queues have no delivery limit.
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

from . import deadletters, outbox
from .connection import connect
from .deadletters import dead_queue_name, dead_reason, give_back, read_all
from .deadletters import text as _text
from .publisher import PublishError
from .replay import replay as replay_events
from .settings import DEFAULT_AMQP_URL

SHOW_BODY_LIMIT = 4000


class Usage(Exception):
    """The command cannot run as asked (exit status 2, with the message)."""


def _amqp_url() -> str:
    return os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)


_DATABASE_URL: list[str] = []  # --database-url, when given


def _database_url() -> str:
    url = (_DATABASE_URL or [os.environ.get("DATABASE_URL", "")])[0]
    if not url:
        raise Usage("this command reads the producer's outbox: set DATABASE_URL or --database-url")
    return url


@contextmanager
def _channel() -> Iterator[BlockingChannel]:
    conn = connect(_amqp_url(), "messaging-cli")
    try:
        yield conn.channel()
    finally:
        if conn.is_open:
            conn.close()


def _headers(properties: Any) -> dict[str, Any]:
    return dict(properties.headers or {})


def dlq_list(queue: str) -> int:
    queue = dead_queue_name(queue)
    with _channel() as channel:
        messages = read_all(channel, queue)
        give_back(channel)
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for _, properties, _ in messages:
        headers = _headers(properties)
        groups[dead_reason(headers)].append(_text(headers.get("x-dead-at", "")))
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
        give_back(channel)
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
    conn = connect(_amqp_url(), "messaging-cli")
    try:
        replayed = deadletters.replay(conn, queue, ids)
    finally:
        if conn.is_open:
            conn.close()
    print(f"replayed {replayed} message(s) from {queue}")
    return 0 if replayed or ids is None else 1


def dlq_purge(queue: str) -> int:
    queue = dead_queue_name(queue)
    with _channel() as channel:
        count = channel.queue_purge(queue).method.message_count
    print(f"purged {count} message(s) from {queue}")
    return 0


PARKED_SHOWN = 100


def outbox_status() -> int:
    with psycopg.connect(_database_url(), connect_timeout=5) as conn:
        backlog, oldest_age = outbox.backlog(conn)
        published, last = outbox.published(conn)
        parked_count = outbox.parked_count(conn)
        parked = outbox.parked(conn, limit=PARKED_SHOWN)
    print(f"unpublished: {backlog}")
    print(f"oldest unpublished: {f'{oldest_age:.1f}s ago' if backlog else '-'}")
    print(f"published: {published}")
    when = datetime.fromtimestamp(last, UTC).isoformat() if last is not None else "never"
    print(f"last published: {when}")
    print(f"parked: {parked_count}")
    for row in parked:
        newer = (
            f"; version {row['superseded_by']} published since"
            if row["superseded_by"] is not None
            else ""
        )
        print(
            f"  #{row['id']} {row['event_type']} {row['entity_id']} v{row['entity_version']} "
            f"parked {row['parked_at'].isoformat()}: {row['parked_reason']}{newer}"
        )
    if parked_count > len(parked):
        print(f"  ... and {parked_count - len(parked)} more")
    if parked_count:
        print("fix the cause, then: messaging outbox retry <id> ... (or --all)")
    return 0


def outbox_retry(ids: list[int] | None) -> int:
    """Give parked rows back to the relay, which publishes them at once."""
    with psycopg.connect(_database_url(), connect_timeout=5) as conn:
        count = outbox.unpark(conn, ids)
    print(f"gave {count} parked row(s) back to the relay")
    return 0 if count or ids is None else 1


def replay(queue: str, entity: str | None, since: datetime | None) -> int:
    """Publish the producer's events straight to one subscriber's queue (replay.py)."""
    with _channel() as channel:
        channel.queue_declare(queue, passive=True)  # a typo must not publish into the void
    try:
        count = replay_events(_database_url(), _amqp_url(), queue, entity=entity, since=since)
    except PublishError as exc:
        print(f"messaging: replay interrupted: {exc}; run it again", file=sys.stderr)
        return 1
    print(f"replayed {count} event(s) to {queue}")
    return 0


def apikey_new(scopes: str) -> int:
    """Print a fresh key (to hand to its client, once) and the API_KEYS entry to configure."""
    from .auth import new_key

    names = [name.strip() for name in scopes.split(",") if name.strip()]
    if not names:
        raise Usage("--scopes needs at least one scope, e.g. orders:write,orders:read")
    try:
        key, entry = new_key(names)
    except ValueError as exc:
        raise Usage(str(exc)) from None
    print(f"key: {key}")
    print(f"API_KEYS entry: {json.dumps(entry)}")
    print("Keep the key secret: only its SHA-256 digest goes into API_KEYS (merge the entry into")
    print("the JSON object there); send it as Authorization: Bearer <key>.")
    return 0


def _since(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="messaging", description=__doc__.split("\n", 1)[0])
    top.add_argument("--database-url", help="the producer's database (else DATABASE_URL)")
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
    outbox_commands = outbox.add_subparsers(dest="action", required=True)
    outbox_commands.add_parser("status", help="backlog, last publish and parked rows")
    retry = outbox_commands.add_parser("retry", help="give parked rows back to the relay")
    chosen = retry.add_mutually_exclusive_group(required=True)
    chosen.add_argument("ids", nargs="*", type=int, default=[], metavar="ID")
    chosen.add_argument("--all", action="store_true")

    keys = commands.add_parser("apikey", help="API keys")
    keys.add_argument("action", choices=["new"])
    keys.add_argument("--scopes", required=True, help="comma-separated, e.g. orders:read")

    rebuild = commands.add_parser("replay", help="publish the producer's events to one queue")
    rebuild.add_argument("--to", required=True, dest="queue")
    rebuild.add_argument("--entity")
    rebuild.add_argument("--since", type=_since, help="ISO time: every event since then")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _DATABASE_URL[:] = [args.database_url] if args.database_url else []
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
            if args.action == "retry":
                return outbox_retry(None if args.all else args.ids)
            return outbox_status()
        if args.command == "apikey":
            return apikey_new(args.scopes)
        return replay(args.queue, args.entity, args.since)
    except pika.exceptions.ChannelClosedByBroker as exc:
        print(f"messaging: the broker refused: {exc.reply_text}", file=sys.stderr)
        return 2
    except (pika.exceptions.AMQPConnectionError, psycopg.OperationalError) as exc:
        print(f"messaging: cannot connect: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except Usage as exc:
        print(f"messaging: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
