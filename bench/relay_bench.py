"""Relay throughput against the raw pika ceiling, on the local PostgreSQL and RabbitMQ.

Run: .venv/bin/python bench/relay_bench.py [--events N]. Prints one `name: value` line per
figure (see bench/README.md); exits non-zero only if a figure could not be measured. Also measures
the raw ceilings of consuming from a quorum queue with pika and of a Redis pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.channel
import psycopg
import redis
from messaging import Envelope, Relay, RelaySettings
from messaging.outbox import install
from messaging.publisher import ConfirmedPublisher, Outgoing, PublishError
from messaging.testing import running
from pika.adapters.select_connection import SelectConnection
from psycopg import sql

DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
WINDOW = 2000  # unconfirmed messages in flight, as the relay's default window
PREFETCH = 1000  # the consumer runtime's default prefetch
ACK_EVERY = 500  # one multiple ack per this many deliveries (the runtime's default max batch)
REDIS_OPS = 50_000
REDIS_BATCH = 500  # commands per pipeline (the runtime's default max batch)
PG_COMMIT_SECONDS = 3.0
RAW_TIMEOUT = 30.0
RELAY_TIMEOUT = 60.0
CLEANUP_TIMEOUT = 90.0  # tests on the same machine stop the broker for a while
RELAY_POLL_INTERVAL = 1.0  # the relay's production default
DRAIN_CHECK_INTERVAL = 0.01
UNPUBLISHED_SQL = "SELECT count(*) FROM messaging_outbox WHERE published_at IS NULL"

FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken")
LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson")
CITIES = ("Amsterdam", "Lisbon", "Tallinn", "Ljubljana", "Valencia", "Ghent", "Porto", "Bergen")

log = logging.getLogger("bench")


class MeasureError(RuntimeError):
    """A figure could not be measured."""


# -- data ------------------------------------------------------------------------------------
def person(i: int) -> dict[str, Any]:
    """A realistic person record, about 400 bytes of JSON."""
    first, last = FIRST_NAMES[i % 8], LAST_NAMES[i // 8 % 8]
    return {
        "id": str(i),
        "first_name": first,
        "last_name": last,
        "email": f"{first.lower()}.{last.lower()}{i}@example.org",
        "phone": f"+31 20 {i % 1000:03d} {i % 10000:04d}",
        "birth_date": f"19{50 + i % 50}-{1 + i % 12:02d}-{1 + i % 28:02d}",
        "address": {
            "street": f"{i % 300 + 1} Keizersgracht",
            "postal_code": f"{1000 + i % 9000} AB",
            "city": CITIES[i % 8],
            "country": "NL",
        },
        "company": "Example Holdings B.V.",
        "job_title": "Senior Software Engineer",
        "tags": ["customer", "newsletter", f"segment-{i % 7}"],
        "active": True,
        "created_at": "2024-05-17T09:30:00+00:00",
    }


def make_envelopes(n: int) -> list[Envelope]:
    """The N `person.created` events both phases publish, as Outbox.add would build them."""
    return [
        Envelope.new(
            event_type="person.created",
            entity_id=str(i),
            entity_version=1,
            data=person(i),
            producer="bench",
        )
        for i in range(1, n + 1)
    ]


# -- servers ---------------------------------------------------------------------------------
def _with_dbname(url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@contextlib.contextmanager
def fresh_database(name: str) -> Iterator[str]:
    """Create an empty database, yield its URL, drop it (WITH FORCE) afterwards."""
    with psycopg.connect(DATABASE_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_dbname(DATABASE_URL, name)
    finally:
        with psycopg.connect(DATABASE_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextlib.contextmanager
def fanout_to_quorum(name: str) -> Iterator[str]:
    """Declare a durable fanout exchange bound to one quorum queue, both named `name`; delete
    both afterwards, waiting up to CLEANUP_TIMEOUT for a broker that went away meanwhile."""
    try:
        with broker_channel() as channel:
            channel.exchange_declare(exchange=name, exchange_type="fanout", durable=True)
            channel.queue_declare(queue=name, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(queue=name, exchange=name)
        yield name
    finally:

        def delete(channel: Any) -> None:
            channel.queue_delete(queue=name)
            channel.exchange_delete(exchange=name)

        broker_cleanup(f"queue and exchange {name}", delete)


def broker_cleanup(what: str, delete: Callable[[Any], None]) -> None:
    """Run `delete(channel)` on a short-lived channel, waiting up to CLEANUP_TIMEOUT for a broker
    that went away meanwhile (tests on the same machine stop it); log if it never came back."""
    deadline = time.monotonic() + CLEANUP_TIMEOUT
    while True:
        try:
            with broker_channel() as channel:
                delete(channel)
            return
        except (pika.exceptions.AMQPError, OSError) as exc:
            if time.monotonic() > deadline:
                log.error("could not delete %s: %r", what, exc)
                return
            time.sleep(3)


@contextlib.contextmanager
def broker_channel() -> Iterator[Any]:
    """A short-lived blocking channel for declarations and deletions."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        yield conn.channel()
    finally:
        if conn.is_open:
            conn.close()


# -- raw_pg_commit_s -------------------------------------------------------------------------
def measure_pg_commits(db_url: str, seconds: float = PG_COMMIT_SECONDS) -> float:
    """Single-row INSERTs, each committed on its own, on one connection."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_commit (id bigserial PRIMARY KEY, payload text)")
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            conn.execute("INSERT INTO bench_commit (payload) VALUES (%s)", ("x" * 100,))
            done += 1
        conn.execute("DROP TABLE bench_commit")
    return done / elapsed


# -- raw_publish_confirmed_msg_s -------------------------------------------------------------
def measure_raw_publish(exchange: str, envelopes: list[Envelope]) -> float:
    """Pre-built messages to the fanout exchange, WINDOW confirms in flight: messages per second
    from the first publish to the last confirm (the library's ConfirmedPublisher, plain pika)."""
    messages = [
        Outgoing(
            "",
            e.to_json(),
            pika.BasicProperties(
                message_id=str(e.event_id),
                type=e.event_type,
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
            ),
        )
        for e in envelopes
    ]
    publisher = ConfirmedPublisher(AMQP_URL, exchange, "bench-raw-publish", window=WINDOW)
    try:
        done = publisher.publish_all(messages, timeout=RAW_TIMEOUT)
    except PublishError as exc:
        raise MeasureError(str(exc)) from exc
    return done.confirmed / done.seconds


# -- raw_consume_msg_s ----------------------------------------------------------------------
class RawConsumer:
    """Consumes N messages from a queue on a SelectConnection: prefetch, multiple acks, no work."""

    def __init__(self, queue: str, n: int, prefetch: int = PREFETCH, ack_every: int = ACK_EVERY):
        if ack_every > prefetch:
            raise ValueError("ack_every must not exceed the prefetch, or delivery stalls")
        self.queue, self.n, self.prefetch, self.ack_every = queue, n, prefetch, ack_every
        self.received = 0
        self.problems: list[str] = []
        self.started = self.finished = 0.0
        self.conn: SelectConnection | None = None

    def run(self, timeout: float = RAW_TIMEOUT) -> float:
        """Consume N messages; messages per second from basic.consume to the last ack."""
        self.conn = SelectConnection(
            pika.URLParameters(AMQP_URL),
            on_open_callback=lambda conn: conn.channel(on_open_callback=self._on_channel),
            on_open_error_callback=lambda _c, exc: self._fail(f"connect failed: {exc}"),
            on_close_callback=lambda _c, _reason: self.conn.ioloop.stop(),
        )
        self.conn.ioloop.call_later(timeout, lambda: self._fail(f"timed out after {timeout}s"))
        self.conn.ioloop.start()
        if self.received < self.n and not self.problems:
            self.problems.append(f"connection closed after {self.received} deliveries")
        if self.problems:
            raise MeasureError("; ".join(self.problems))
        return self.n / (self.finished - self.started)

    def _on_channel(self, channel: Any) -> None:
        channel.basic_qos(prefetch_count=self.prefetch, callback=lambda _f: self._start(channel))

    def _start(self, channel: Any) -> None:
        self.started = time.perf_counter()
        channel.basic_consume(self.queue, self._on_message)

    def _on_message(self, channel: Any, method: Any, _props: Any, _body: bytes) -> None:
        self.received += 1
        if self.received % self.ack_every == 0 or self.received == self.n:
            channel.basic_ack(method.delivery_tag, multiple=True)
        if self.received == self.n:
            self.finished = time.perf_counter()
            self.conn.close()

    def _fail(self, why: str) -> None:
        self.problems.append(why)
        if self.conn.is_open:
            self.conn.close()
        else:
            self.conn.ioloop.stop()


def measure_consume(queue: str, n: int) -> float:
    """Consume the N messages the raw publish phase left in `queue`."""
    with broker_channel() as channel:
        waiting = channel.queue_declare(queue=queue, passive=True).method.message_count
    if waiting < n:
        raise MeasureError(f"the queue holds {waiting} messages, not {n}")
    return RawConsumer(queue, n).run()


# -- redis_pipeline_ops_s --------------------------------------------------------------------
# A version-gated HSET, the shape of the score consumer's scripts (one HGET, one HSET).
GATED_HSET = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if stored >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'value', ARGV[2])
return 1
"""


def measure_redis_pipeline(prefix: str, n: int = REDIS_OPS, batch: int = REDIS_BATCH) -> float:
    """EVALSHA of GATED_HSET on N distinct keys, in non-transactional pipelines of `batch`."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        sha = client.script_load(GATED_HSET)
        start = time.perf_counter()
        for first in range(0, n, batch):
            pipe = client.pipeline(transaction=False)
            for i in range(first, min(first + batch, n)):
                pipe.evalsha(sha, 1, f"{prefix}{i}", 1, "1000.00")
            pipe.execute()
        elapsed = time.perf_counter() - start
    finally:
        for first in range(0, n, 1000):
            client.unlink(*(f"{prefix}{i}" for i in range(first, min(first + 1000, n))))
        client.close()
    return n / elapsed


# -- relay_events_s --------------------------------------------------------------------------
def prefill_outbox(db_url: str, envelopes: list[Envelope]) -> None:
    """Install the outbox and COPY in the rows Outbox("bench").add would have written."""
    with psycopg.connect(db_url) as conn:
        install(conn)
        with conn.cursor() as cur:
            copy_sql = "COPY messaging_entity_versions (entity, entity_id, version) FROM STDIN"
            with cur.copy(copy_sql) as copy:
                for e in envelopes:
                    copy.write_row((e.entity, e.entity_id, e.entity_version))
            copy_sql = (
                "COPY messaging_outbox (event_id, event_type, entity, entity_id, entity_version,"
                " occurred_at, correlation_id, body) FROM STDIN"
            )
            with cur.copy(copy_sql) as copy:
                for e in envelopes:
                    copy.write_row(
                        (
                            e.event_id,
                            e.event_type,
                            e.entity,
                            e.entity_id,
                            e.entity_version,
                            e.occurred_at,
                            e.correlation_id,
                            e.to_json().decode(),
                        )
                    )
        conn.commit()
        conn.execute("ANALYZE messaging_outbox")
        conn.commit()


@contextlib.contextmanager
def first_publish_clock() -> Iterator[list[float]]:
    """While open, the time (perf_counter) of the first basic.publish any pika channel of this
    process makes: pika's Channel.basic_publish is wrapped until that first call, which puts
    the original back, so the publishes after it run unwrapped."""
    original = pika.channel.Channel.basic_publish
    seen: list[float] = []

    def first(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not seen:
            seen.append(time.perf_counter())
            pika.channel.Channel.basic_publish = original
        return original(self, *args, **kwargs)

    pika.channel.Channel.basic_publish = first
    try:
        yield seen
    finally:
        pika.channel.Channel.basic_publish = original


def measure_relay(db_url: str, exchange: str, n: int) -> float:
    """Start a relay on the pre-filled outbox; events per second from its first publish (its
    election, database and broker connects and channel set-up left out, as the raw publisher's
    are) until no row is unpublished."""
    relay = Relay(
        RelaySettings(
            database_url=db_url,
            amqp_url=AMQP_URL,
            exchange=exchange,
            producer="bench",
            poll_interval=RELAY_POLL_INTERVAL,
        )
    )
    with psycopg.connect(db_url, autocommit=True) as watch, first_publish_clock() as first:
        start = time.perf_counter()
        with running(relay):
            end = start + wait_until_drained(relay, watch, start, n)
    join_listener_threads()
    if not first:
        raise MeasureError("the relay drained the outbox without publishing")
    log.info(
        "relay: first publish %.0f ms after start (connects, not timed); %d events in %.2fs "
        "from then (%.2fs with the set-up)",
        (first[0] - start) * 1000,
        n,
        end - first[0],
        end - start,
    )
    return n / (end - first[0])


def wait_until_drained(relay: Relay, watch: psycopg.Connection, start: float, n: int) -> float:
    """Seconds from start until the unpublished count is 0, checked every 10 ms.

    count(*) is a sequential scan (~10 ms on 20k rows): issuing it every 10 ms would keep a
    database core busy, so the relay's own mark counter gates it; the count then
    confirms, and alone decides whenever the counter and the table disagree.
    """
    while True:
        now = time.perf_counter()
        if relay.stats.published >= n or now - start > RELAY_TIMEOUT:
            left = watch.execute(UNPUBLISHED_SQL).fetchone()[0]
            if left == 0:
                return now - start
            if now - start > RELAY_TIMEOUT:
                raise MeasureError(f"relay published {n - left}/{n} rows in {RELAY_TIMEOUT}s")
        time.sleep(DRAIN_CHECK_INTERVAL)


def join_listener_threads(timeout: float = 2.0) -> None:
    """Let stopped relays' LISTEN threads (they poll every 0.5 s) close before the DB is dropped."""
    for thread in threading.enumerate():
        if thread.name == "outbox-listener":
            thread.join(timeout)


# -- driver ----------------------------------------------------------------------------------
def measure(name: str, step: Callable[[], float], figures: dict[str, float]) -> None:
    """Run one measurement, print its figure, or log why it could not be measured."""
    try:
        figures[name] = step()
    except Exception as exc:
        log.error("%s: not measured (%s: %s)", name, type(exc).__name__, exc)
        return
    print(f"{name}: {figures[name]:.0f}", flush=True)


COMPACT_ENTITIES, COMPACT_VERSIONS = 20_000, 6


def measure_compaction(db_url: str) -> float:
    """Rows per second one compaction pass deletes: 20,000 entities with 6 published versions
    each (100,000 superseded rows), as steady updates to the same people leave them."""
    from datetime import timedelta

    from messaging.relay import RelayStats, _Compactor

    with psycopg.connect(db_url) as conn:
        # The relay's figures left rows published seconds ago, younger than the retention: the
        # compactor's cursor would wait at the first of them. This pass starts after them.
        (after,) = conn.execute("SELECT coalesce(max(id), 0) FROM messaging_outbox").fetchone()
        conn.execute(
            """
            INSERT INTO messaging_outbox (event_id, event_type, entity, entity_id,
                                          entity_version, occurred_at, body, published_at)
            SELECT gen_random_uuid(), 'person.updated', 'compact', 'c' || e, v, now(),
                   '{"data": "a person of some 400 bytes"}', now() - interval '1 hour'
            FROM generate_series(1, %s) v, generate_series(1, %s) e ORDER BY v, e
            """,
            (COMPACT_VERSIONS, COMPACT_ENTITIES),
        )
    stats = RelayStats()
    settings = RelaySettings(
        database_url=db_url, amqp_url=AMQP_URL, exchange="unused", retention=timedelta(minutes=1)
    )
    compactor = _Compactor(settings, stats)
    compactor.cursor = after
    with psycopg.connect(db_url, autocommit=True) as db:
        db.execute("VACUUM ANALYZE messaging_outbox")
        start = time.perf_counter()
        while compactor.compact_once(db):
            pass
        seconds = time.perf_counter() - start
    expected = COMPACT_ENTITIES * (COMPACT_VERSIONS - 1)
    if stats.compacted < expected:
        raise MeasureError(f"compacted {stats.compacted} of {expected} superseded rows")
    return stats.compacted / seconds


def run(n: int) -> dict[str, float]:
    """Measure every figure in one run, in a database, exchanges and queues named for this run."""
    run_id = uuid.uuid4().hex[:10]
    envelopes = make_envelopes(n)
    figures: dict[str, float] = {}
    with fresh_database(f"bench_{run_id}") as db_url:
        measure("raw_pg_commit_s", lambda: measure_pg_commits(db_url), figures)
        with fanout_to_quorum(f"bench-raw-{run_id}") as exchange:
            measure(
                "raw_publish_confirmed_msg_s",
                lambda: measure_raw_publish(exchange, envelopes),
                figures,
            )
            measure("raw_consume_msg_s", lambda: measure_consume(exchange, n), figures)
        measure(
            "redis_pipeline_ops_s",
            lambda: measure_redis_pipeline(f"bench-redis-{run_id}:"),
            figures,
        )
        prefill_outbox(db_url, envelopes)
        with fanout_to_quorum(f"bench-relay-{run_id}") as exchange:
            measure("relay_events_s", lambda: measure_relay(db_url, exchange, n), figures)
        measure("compaction_rows_s", lambda: measure_compaction(db_url), figures)
    return figures


def interrupted(signum: int, _frame: Any) -> None:
    """SIGTERM handler: raise KeyboardInterrupt, so every clean-up runs."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the ratio; 1 if anything went unmeasured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50000, help="events per phase")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # its failures surface as exceptions
    log.setLevel(logging.INFO)  # the relay's set-up time, left out of its figure
    signal.signal(signal.SIGTERM, interrupted)  # run the clean-ups, as on Ctrl-C
    print(f"events: {args.events}", flush=True)
    try:
        figures = run(args.events)
    except Exception as exc:
        log.error("benchmark aborted: %s: %s", type(exc).__name__, exc)
        return 1
    relay, raw = figures.get("relay_events_s"), figures.get("raw_publish_confirmed_msg_s")
    if relay is not None and raw is not None:
        print(f"relay_vs_raw_ratio: {relay / raw:.2f}", flush=True)
    expected = (
        "raw_pg_commit_s",
        "raw_publish_confirmed_msg_s",
        "raw_consume_msg_s",
        "redis_pipeline_ops_s",
        "relay_events_s",
        "compaction_rows_s",
    )
    return 0 if all(name in figures for name in expected) else 1


if __name__ == "__main__":
    sys.exit(main())
