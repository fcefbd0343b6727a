"""The operator's command: `messaging dlq ...`, `messaging outbox status`, `messaging replay ...`.

    messaging dlq list <queue>                  dead messages grouped by reason
    messaging dlq show <queue> [--id EVENT_ID]  headers and body
    messaging dlq replay <queue> (--id ID ... | --all)
                                                (list, show, replay: [--window N])
    messaging dlq purge <queue> --yes
    messaging outbox status                     backlog, oldest unpublished, last publish, the
                                                outbox's position, and the rows the relay
                                                parked, each with its reason
    messaging outbox retry (ID ... | --all)     give parked rows back to the relay (after a fix)
    messaging replay --to <queue> [--entity E] [--after-id POSITION | --since ISO]
    messaging verify <queue> [--timeout S]      compare the read model fed by <queue> with the
                                                producer now: the buckets that differ, then the
                                                entities in them (exit 1 if any differ)
    messaging declare SERVICE ...               declare each service's queues (before start-up)
    messaging broker-user [--consumers C,...] [ROLE ...]
                                                create AMQP_URL's user (no tags, every
                                                permission), or each role's from <ROLE>_AMQP_URL
                                                with only its permissions (permissions.py),
                                                through the management API
                                                (RABBITMQ_MANAGEMENT_URL, RABBITMQ_ADMIN_USER,
                                                RABBITMQ_ADMIN_PASSWORD)

The broker is AMQP_URL (one node, or several of a cluster, comma-separated); the producer's
database is DATABASE_URL (or --database-url). `<queue>` may be a dead queue's name or its work
queue's (`.dead` is then added). No dlq command holds more than `--window` dead letters
unacknowledged at a time (deadletters.py): listing and showing look at the head of the queue and
give it back at once, never consuming a dead letter; `show --id` and `replay` go past the window
by moving the messages they pass to the tail of the dead queue.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pika
import psycopg
from pika.adapters.blocking_connection import BlockingChannel
from servicekit.settings import refuse_placeholder

from . import deadletters, outbox, permissions
from .connection import connect, node_urls
from .deadletters import DEFAULT_WINDOW, dead_queue_name
from .deadletters import text as _text
from .publisher import PublishError
from .replay import DIGESTS, declare_requests, request_replay
from .replay import replay as replay_events
from .settings import DEFAULT_AMQP_URL, BrokerSettings
from .verification import REPORT_TYPE

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


def _dead_letters(queue: str, window: int) -> deadletters.DeadLetters:
    return deadletters.DeadLetters(_amqp_url(), queue, window=window, client_name="messaging-cli")


def dlq_list(queue: str, window: int) -> int:
    """Group the dead letters by reason, from their headers, a window at a time."""
    look = _dead_letters(queue, window).look()
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for letter in look.letters:
        groups[letter.reason].append(letter.dead_at)
    name = dead_queue_name(queue)
    if look.partial:
        print(
            f"{name}: {look.depth} dead message(s); grouped below: the {len(look.letters)} "
            f"at its head (a look holds at most --window {window})"
        )
    else:
        print(f"{name}: {look.depth} dead message(s)")
    for reason, times in sorted(groups.items(), key=lambda item: -len(item[1])):
        known = sorted(t for t in times if t)
        span = f"  oldest {known[0]}  newest {known[-1]}" if known else ""
        print(f"{len(times):6d}  {reason}{span}")
    return 0


def dlq_show(queue: str, event_id: str | None, window: int) -> int:
    dead = _dead_letters(queue, window)
    if event_id is None:
        look = dead.look(keep_body=lambda _letter, _body: True)
        if look.partial:
            print(f"(the {len(look.letters)} at the head of {dead.queue}'s {look.depth})")
        for letter in look.letters:
            _print_letter(letter)
        return 0
    found, outcome = dead.find(event_id)
    if found is None:
        print(
            f"no message {event_id} among the {outcome.scanned} scanned of {dead.queue}'s "
            f"{outcome.depth}",
            file=sys.stderr,
        )
        return 1
    _print_letter(found)
    return 0


def _print_letter(letter: deadletters.Letter) -> None:
    print(f"--- message_id: {letter.message_id}  type: {letter.type}")
    for name, value in sorted(letter.headers.items()):
        if name != "x-death":
            print(f"{name}: {_text(value)}")
    body = letter.body or b""
    try:
        text = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        text = repr(body[:SHOW_BODY_LIMIT])
    if len(text) > SHOW_BODY_LIMIT:
        text = f"{text[:SHOW_BODY_LIMIT]}\n... ({len(body)} bytes in all)"
    print(text)


def dlq_replay(queue: str, ids: list[str] | None, window: int) -> int:
    """Republish to the work queue with a confirm, then remove from the dead queue."""
    dead = _dead_letters(queue, window)
    try:
        outcome = dead.replay(ids)
    except deadletters.Interrupted as exc:
        _report("replayed", dead.queue, exc.outcome)
        print(f"messaging: interrupted: {exc}; run it again", file=sys.stderr)
        return 1
    _report("replayed", dead.queue, outcome)
    return 1 if outcome.missing else 0


def _report(done: str, queue: str, outcome: deadletters.Outcome) -> None:
    """The counts of a replay or discard, and what was not done."""
    print(f"{done} {outcome.done} message(s) from {queue}")
    if outcome.missing:
        shown = ", ".join(outcome.missing[:20]) + (" ..." if len(outcome.missing) > 20 else "")
        print(f"not found among the {outcome.scanned} scanned: {shown}")
    if outcome.remaining:
        print(
            f"{outcome.remaining} message(s) are in {queue} now (not chosen, dead again, newly "
            "dead, or given back by another reader)"
        )
    if outcome.other_readers:
        print(
            f"another reader was attached to {queue} while this ran: the messages it held "
            "could not be seen; run this again when it is done"
        )


def dlq_purge(queue: str) -> int:
    queue = dead_queue_name(queue)
    with _channel() as channel:
        count = channel.queue_purge(queue).method.message_count
    print(f"purged {count} message(s) from {queue}")
    return 0


PARKED_SHOWN = 100


def outbox_status() -> int:
    with psycopg.connect(_database_url(), connect_timeout=5, autocommit=True) as conn:
        backlog, oldest_age = outbox.backlog(conn)
        published, last = outbox.published(conn)
        at = _position(conn)
        parked_count = outbox.parked_count(conn)
        parked = outbox.parked(conn, limit=PARKED_SHOWN)
    print(f"unpublished: {backlog}")
    print(f"oldest unpublished: {f'{oldest_age:.1f}s ago' if backlog else '-'}")
    print(f"published: {published}")
    when = datetime.fromtimestamp(last, UTC).isoformat() if last is not None else "never"
    print(f"last published: {when}")
    print(f"position: {at}  (messaging replay --after-id {at} sends what is written from now on)")
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


def _position(conn: psycopg.Connection) -> str:
    try:
        return str(outbox.position(conn))
    except outbox.OutboxBusy as exc:
        return f"unknown ({exc})"
    except psycopg.errors.InsufficientPrivilege:
        return "unknown (taking it locks the outbox table: a role that may write it can)"


def replay(queue: str, entity: str | None, after_id: int | None, since: datetime | None) -> int:
    """Publish the producer's events straight to one subscriber's queue (replay.py)."""
    with _channel() as channel:
        channel.queue_declare(queue, passive=True)  # a typo must not publish into the void
    try:
        count = replay_events(
            _database_url(), _amqp_url(), queue, entity=entity, after_id=after_id, since=since
        )
    except PublishError as exc:
        print(f"messaging: replay interrupted: {exc}; run it again", file=sys.stderr)
        return 1
    print(f"replayed {count} event(s) to {queue}")
    return 0


def verify(queue: str, timeout: float) -> int:
    """Ask the read model fed by `queue` to verify itself now (verification.py) and print its
    report: the buckets that differ, then the entities in them, with the producer's versions
    when DATABASE_URL is set."""
    exchange = os.environ.get("EVENTS_EXCHANGE")
    if not exchange:
        raise Usage("verify needs EVENTS_EXCHANGE: the exchange whose producer answers")
    conn = connect(_amqp_url(), "messaging-verify")
    try:
        channel = conn.channel()
        channel.queue_declare(queue, passive=True)  # a typo must not wait for nobody
        reply_to = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        request_id = f"verify-cli-{uuid.uuid4()}"
        request_replay(_amqp_url(), exchange, queue, request_id, DIGESTS, reply_to=reply_to)
        report = None
        for _method, properties, body in channel.consume(
            reply_to, auto_ack=True, inactivity_timeout=timeout
        ):
            if body is None:
                break
            if getattr(properties, "type", None) == REPORT_TYPE:
                report = json.loads(body)
                break
        channel.cancel()
    finally:
        if conn.is_open:
            conn.close()
    if report is None:
        print(
            f"messaging: no report from {queue}'s consumer within {timeout:g}s (is it running, "
            "with verification on, and its queue drained?)",
            file=sys.stderr,
        )
        return 2
    return _print_verification(queue, report)


def _print_verification(queue: str, report: dict) -> int:
    divergent: dict[str, list[int]] = report.get("divergent") or {}
    if not divergent:
        print(f"{queue}: the read model matches the producer")
        return 0
    count = sum(len(b) for b in divergent.values())
    print(f"{queue}: {count} bucket(s) differ from the producer")
    published: dict[str, dict[str, int]] = {}
    if _DATABASE_URL or os.environ.get("DATABASE_URL"):
        with psycopg.connect(_database_url(), connect_timeout=5, autocommit=True) as db:
            for entity, buckets in divergent.items():
                published[entity] = outbox.published_versions(db, entity, buckets)
    for entity, buckets in sorted(divergent.items()):
        print(f"  {entity}: buckets {', '.join(str(b) for b in buckets)}")
        held = report.get("held", {}).get(entity, {})
        if entity not in published:
            for entity_id, version in sorted(held.items()):
                print(f"    {entity_id}: v{version} held")
            continue
        theirs = published[entity]
        for entity_id in sorted(set(theirs) | set(held)):
            mine, wanted = held.get(entity_id), theirs.get(entity_id)
            if mine != wanted:
                print(
                    f"    {entity_id}: published v{wanted if wanted is not None else '-'}, "
                    f"held {f'v{mine}' if mine is not None else '-'}"
                )
    if not report.get("complete", True):
        print("  (the model listed only part of what it holds in these buckets)")
    if not published:
        print("  (set DATABASE_URL to see the producer's versions beside the model's)")
    print("the model repairs a bucket that differs in two checks in a row by itself")
    return 1


def declare(services: list[str]) -> int:
    """Declare each service's queues before start-up, so no event is routed while a consumer's
    queue does not exist yet (the relay would hold it, returned, until one did). The caller
    names the services (the stack and compose do)."""
    if not os.environ.get("EVENTS_EXCHANGE"):
        raise Usage("declare needs EVENTS_EXCHANGE: the exchange the services' queues bind to")
    settings = BrokerSettings()
    conn = connect(settings.amqp_url, "topology")
    try:
        for service in services:
            topology = settings.topology(service)
            topology.declare(conn)
            print(f"declared {topology.queue} (+ retry and dead queues) on {topology.exchange}")
        # The relay's requests queue too: a consumer's broker role may publish to it, not make it
        print(f"declared {declare_requests(conn, settings.events_exchange)}")
    finally:
        if conn.is_open:
            conn.close()
    return 0


def broker_user(roles: list[str] | None = None, consumers: list[str] | None = None) -> int:
    """Create broker users, no administrators, idempotently, through the management API.

    Without roles: AMQP_URL's user, password and virtual host, with every permission on it (one
    user for every process: the development stack's way). With roles (permissions.py): each
    role's user from `<ROLE>_AMQP_URL` (RELAY_AMQP_URL, SCORE_AMQP_URL, ...), with only what
    that role does on EVENTS_EXCHANGE. No tags either way (no management, no policies)."""
    wanted: list[tuple[str, str | None]] = [("AMQP_URL", None)]
    if roles:
        if not os.environ.get("EVENTS_EXCHANGE"):
            raise Usage("broker-user with roles needs EVENTS_EXCHANGE: their permissions name it")
        if not consumers:
            raise Usage("broker-user with roles needs --consumers: the consuming services")
        known = permissions.roles(consumers)
        unknown = [role for role in roles if role not in known]
        if unknown:
            raise Usage(f"broker-user: no role {', '.join(unknown)} (one of {', '.join(known)})")
        wanted = [(f"{role.upper()}_AMQP_URL", role) for role in roles]
    users = [(*_user_of(variable), role) for variable, role in wanted]
    try:
        base = os.environ["RABBITMQ_MANAGEMENT_URL"]
        admin = f"{os.environ['RABBITMQ_ADMIN_USER']}:{os.environ['RABBITMQ_ADMIN_PASSWORD']}"
    except KeyError as exc:
        raise Usage(f"broker-user needs {exc.args[0]}") from None
    auth = base64.b64encode(admin.encode()).decode()
    for user, password, vhost, role in users:
        granted = (
            {"configure": ".*", "write": ".*", "read": ".*"}
            if role is None
            else permissions.permissions(role, os.environ["EVENTS_EXCHANGE"], consumers or ())
        )
        quoted_user = urllib.parse.quote(user, safe="")
        quoted_vhost = urllib.parse.quote(vhost, safe="")
        try:
            _management_put(base, f"users/{quoted_user}", {"password": password, "tags": ""}, auth)
            _management_put(base, f"permissions/{quoted_vhost}/{quoted_user}", granted, auth)
        except (urllib.error.URLError, OSError) as exc:
            print(f"messaging: the management API refused: {exc}", file=sys.stderr)
            return 1
        what = (
            "all permissions on its virtual host"
            if role is None
            else f"role {role}: " + ", ".join(f"{k} {v}" for k, v in granted.items())
        )
        print(f"broker user {user} on {vhost}: no tags, {what}")
    return 0


def _user_of(variable: str) -> tuple[str, str, str]:
    """The user, password and virtual host of the first node of the URL in `variable`."""
    url = os.environ.get(variable) or (_amqp_url() if variable == "AMQP_URL" else "")
    if not url:
        raise Usage(f"broker-user needs {variable}")
    amqp = urllib.parse.urlsplit(node_urls(url)[0])
    user = urllib.parse.unquote(amqp.username or "")
    password = urllib.parse.unquote(amqp.password or "")
    vhost = urllib.parse.unquote(amqp.path.lstrip("/")) or "/"
    if not user or not password:
        raise Usage(f"broker-user: {variable} must name a user and a password")
    try:  # a user whose password everyone who read the manifests knows is never made
        refuse_placeholder(f"broker-user: the password of {variable}", password)
    except ValueError as exc:
        raise Usage(str(exc)) from None
    return user, password, vhost


def _management_put(base: str, path: str, body: dict, auth: str) -> None:
    request = urllib.request.Request(
        f"{base.rstrip('/')}/api/{path}",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"},
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def _window(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("the window holds at least one message")
    return value


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
    for command in (listing, show, again):
        command.add_argument(
            "--window",
            type=_window,
            default=DEFAULT_WINDOW,
            help=f"messages held unacknowledged at most at a time (default {DEFAULT_WINDOW})",
        )
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

    checking = commands.add_parser("verify", help="compare a read model with the producer now")
    checking.add_argument("queue")
    checking.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the model's report (default 120)",
    )

    declaring = commands.add_parser("declare", help="declare consuming services' queues")
    declaring.add_argument("services", nargs="+", metavar="SERVICE")
    users = commands.add_parser(
        "broker-user", help="create the broker users through the management API"
    )
    users.add_argument(
        "roles",
        nargs="*",
        metavar="ROLE",
        help="relay, a consuming service, operator, probe: <ROLE>_AMQP_URL's user with that "
        "role's permissions (none: AMQP_URL's user with every permission)",
    )
    users.add_argument(
        "--consumers",
        type=lambda text: [name for name in text.split(",") if name],
        help="the consuming services, comma-separated (their queues are named in the roles)",
    )

    rebuild = commands.add_parser("replay", help="publish the producer's events to one queue")
    rebuild.add_argument("--to", required=True, dest="queue")
    rebuild.add_argument("--entity")
    start = rebuild.add_mutually_exclusive_group()
    start.add_argument(
        "--after-id",
        type=int,
        metavar="POSITION",
        help="every event after this outbox position (`messaging outbox status` prints it)",
    )
    start.add_argument(
        "--since",
        type=_since,
        metavar="ISO",
        help="every event published since then, on the database's clock",
    )
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _DATABASE_URL[:] = [args.database_url] if args.database_url else []
    try:
        if args.command == "dlq":
            if args.action == "list":
                return dlq_list(args.queue, args.window)
            if args.action == "show":
                return dlq_show(args.queue, args.event_id, args.window)
            if args.action == "replay":
                return dlq_replay(args.queue, None if args.all else args.ids, args.window)
            return dlq_purge(args.queue)
        if args.command == "outbox":
            if args.action == "retry":
                return outbox_retry(None if args.all else args.ids)
            return outbox_status()
        if args.command == "declare":
            return declare(args.services)
        if args.command == "broker-user":
            return broker_user(args.roles, args.consumers)
        if args.command == "verify":
            return verify(args.queue, args.timeout)
        return replay(args.queue, args.entity, args.after_id, args.since)
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
