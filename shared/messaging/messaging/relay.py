"""Outbox relay: publish committed outbox rows to RabbitMQ, marking them only after the confirm.

One active relay per database (a PostgreSQL advisory lock elects it; a second one waits as a
standby). The lock is the server's: after a failover to a promoted standby nobody holds it there,
and the first relay to reach the new primary takes it (the old primary's sessions died with it;
it must never serve again but as a standby: docs/operations.md). A relay never leads on a
standby. Rows are published in id order on one channel with a window of unconfirmed messages
(pipelined publisher confirms), `mandatory` and persistent. An ack marks the row published; a nack
or a return (no queue bound) leaves it unpublished, to be published again after a backoff. The
relay wakes on LISTEN/NOTIFY and also polls, and it survives broker and database restarts: no
exception of any class ends it (each is logged with its reason, and it starts over after a
backoff, on the next node of AMQP_URL).

No row holds back the rows behind it. A row the broker cannot take as it is (properties that do
not encode as AMQP, a correlation id over 255 bytes say, or a body past the limit consumers
accept), or one the broker closed the channel on `park_after_closures` times in a row, is
*parked*: marked with its reason and skipped, the outbox's own
dead letter. `messaging outbox status` lists parked rows, `messaging outbox retry` gives them
back after a fix. Later rows of the parked row's entity are published meanwhile: each event
carries the entity's whole state, so they supersede it, the listing says so, and a parked row
sent again is skipped by the consumers' version gate wherever a newer version was applied.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pika
import psycopg
from pika.adapters.select_connection import SelectConnection
from servicekit import tracing
from servicekit.runner import replica_id

from .confirms import ConfirmWindow
from .connection import Backoff, StopFlag, amqp_parameters, where
from .digests import BUCKET_SQL, CONTRIBUTION_SQL, MODULUS, sql_with_params
from .envelope import MAX_BODY_BYTES
from .outbox import DELETION_SQL, MARK_LOCK, NOTIFY_CHANNEL
from .publisher import event_properties, unpublishable

log = logging.getLogger("messaging.relay")

APP_NAME = "messaging-relay"  # shows in pg_stat_activity
LEADER_LOCK = 0x6D737201  # advisory lock id held by the active relay

FETCH_SQL = """
SELECT id, event_id::text, event_type, correlation_id, body, trace_context
FROM messaging_outbox
WHERE published_at IS NULL AND parked_at IS NULL AND id > %s
ORDER BY id
LIMIT %s
"""
# Mark confirmed rows and count them, in one statement.
_BUCKET = sql_with_params(BUCKET_SQL).format(entity="entity", entity_id="entity_id")
_CONTRIBUTION = sql_with_params(CONTRIBUTION_SQL).format(
    entity="entity", entity_id="entity_id", version="version"
)
# Mark confirmed rows, keep the newest published version of each entity (and whether it is a
# deletion) and its bucket's digest (digests.py: minus the entity's old contribution, plus its
# new one; a deletion's is none), and count them, in one statement. The digests are what read
# models are verified against.
_DELETION = DELETION_SQL.format(event_type="event_type", entity="entity")
MARK_SQL = f"""
WITH marked AS (
    UPDATE messaging_outbox SET published_at = now()
    WHERE id = ANY(%s) AND published_at IS NULL
    RETURNING entity, entity_id, entity_version, {_DELETION} AS deleted
), latest AS (
    SELECT DISTINCT ON (entity, entity_id) entity, entity_id, entity_version AS version, deleted
    FROM marked ORDER BY entity, entity_id, entity_version DESC
), prior AS MATERIALIZED (
    SELECT p.entity, p.entity_id, p.contribution, p.deleted
    FROM messaging_published p JOIN latest l USING (entity, entity_id)
), upserted AS (
    INSERT INTO messaging_published AS p (entity, entity_id, version, bucket, contribution, deleted)
    SELECT entity, entity_id, version, {_BUCKET}, {_CONTRIBUTION}, deleted FROM latest
    ON CONFLICT (entity, entity_id) DO UPDATE
    SET version = EXCLUDED.version, contribution = EXCLUDED.contribution,
        deleted = EXCLUDED.deleted
    WHERE p.version < EXCLUDED.version
    RETURNING entity, entity_id, bucket, contribution, deleted
), deltas AS (
    SELECT u.entity, u.bucket,
           sum(CASE WHEN u.deleted THEN 0 ELSE u.contribution END
               - CASE WHEN pr.entity IS NULL OR pr.deleted THEN 0 ELSE pr.contribution END)
               AS delta,
           sum((NOT u.deleted)::int - (pr.entity IS NOT NULL AND NOT pr.deleted)::int) AS added
    FROM upserted u LEFT JOIN prior pr USING (entity, entity_id) GROUP BY u.entity, u.bucket
), digested AS (
    INSERT INTO messaging_digests AS d (entity, bucket, digest, entities)
    SELECT entity, bucket, ((delta %% {MODULUS}) + {MODULUS}) %% {MODULUS}, added FROM deltas
    ON CONFLICT (entity, bucket) DO UPDATE
    SET digest = (d.digest + EXCLUDED.digest) %% {MODULUS},
        entities = d.entities + EXCLUDED.entities
)
INSERT INTO messaging_relay_stats AS s (name, published, last_published_at)
SELECT 'relay', count(*), now() FROM marked
ON CONFLICT (name) DO UPDATE
SET published = s.published + EXCLUDED.published, last_published_at = EXCLUDED.last_published_at
"""
PARK_SQL = """
UPDATE messaging_outbox SET parked_at = now(), parked_reason = %s
WHERE id = %s AND published_at IS NULL AND parked_at IS NULL
"""
# Compaction keeps the newest event of every entity forever (replay rebuilds read models from
# it) and drops the older versions of an entity once a newer one is published and past the
# retention. It walks the outbox in id order behind a cursor: a row is looked at once, when it
# is old enough, and deletes the published older versions of its own entity (versions of one
# entity are in id order: each is allocated under the lock of the one before).
COMPACT_SCAN_SQL = """
SELECT id, entity, entity_id, entity_version,
       coalesce(published_at, parked_at) < now() - %s AS old_enough
FROM messaging_outbox WHERE id > %s ORDER BY id LIMIT %s
"""
COMPACT_DELETE_SQL = """
DELETE FROM messaging_outbox o
USING unnest(%b::text[], %b::text[], %b::bigint[]) AS n(entity, entity_id, version)
WHERE o.entity = n.entity AND o.entity_id = n.entity_id AND o.entity_version < n.version
  AND o.published_at IS NOT NULL
"""


@dataclass(frozen=True)
class RelaySettings:
    """Where a relay reads its outbox and publishes it, and how.

    `database_url` is the producer's database (one relay per database is active, a second waits
    as a standby); `amqp_url` lists the broker's nodes; `exchange` is the fanout exchange events
    are published to. Up to `window` messages are unconfirmed at a time, rows are read `batch` at
    a time, and a poll every `poll_interval` seconds backs up LISTEN/NOTIFY. Published older
    versions of an entity are deleted once a newer one is published and older than `retention`
    (None: never), `compact_batch` rows at a time every `compact_interval` seconds; each entity's
    newest event is always kept. A row whose body is past `max_body_bytes`, or that the broker
    closed the channel on `park_after_closures` times, is parked with its reason.
    """

    database_url: str
    amqp_url: str
    exchange: str
    producer: str = "relay"
    window: int = 2000
    batch: int = 500
    poll_interval: float = 1.0
    retention: timedelta | None = timedelta(days=7)
    compact_interval: float = 10.0
    compact_batch: int = 5000
    shutdown_timeout: float = 10.0
    max_body_bytes: int = MAX_BODY_BYTES  # consumers refuse larger bodies (envelope.decode)
    park_after_closures: int = 3


@dataclass
class RelayStats:
    published: int = 0
    failed: int = 0
    compacted: int = 0
    parked: int = 0
    last_published_at: float | None = None


@dataclass(frozen=True)
class _InFlight:
    row_id: int
    event_id: str


class Relay:
    """Runs until stop(): elect, connect, publish, and start over after any failure."""

    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.stats = RelayStats()
        self._stop = StopFlag()
        self._session: _Session | None = None
        self.is_leader = threading.Event()
        self._nodes = amqp_parameters(settings.amqp_url, f"{settings.producer}-relay")
        self._node = 0  # the node to connect to; the next one after a failure
        # After the broker closed on rows in flight, the rows up to this id are published one at
        # a time, so that a row it closes on again is known for sure (None: the full window).
        self.careful_until: int | None = None
        self.suspects: dict[int, int] = {}  # row id -> closures while it was alone in flight

    def stop(self) -> None:
        """Ask the relay to finish in-flight confirms and return from run(); thread-safe."""
        self._stop.set()
        session = self._session
        if session is not None:
            session.request_stop()

    def run(self) -> None:
        backoff = Backoff()
        warned_standby = False
        while not self._stop.is_set():
            try:
                # The session that holds the leader lock names its replica (pg_stat_activity
                # says which relay is active).
                with psycopg.connect(
                    self.settings.database_url,
                    autocommit=True,
                    application_name=f"{APP_NAME}@{replica_id()}"[:63],
                ) as db:
                    led = _try_lead(db)
                    if led is None and not warned_standby:
                        log.warning(
                            "the database is a standby (read-only): waiting for a primary "
                            "(list every server and target_session_attrs=read-write in the URL)"
                        )
                    warned_standby = led is None
                    if not led:
                        self._stop.wait(self.settings.poll_interval)
                        continue
                    self.is_leader.set()
                    log.info("relay elected; publishing to exchange %s", self.settings.exchange)
                    self._session = _Session(self, db, self._nodes[self._node])
                    try:
                        self._session.run()
                    finally:
                        self._session = None
                        self.is_leader.clear()
                backoff.reset()
            except Exception as exc:  # nothing ends the relay: log, back off, start over
                if not isinstance(exc, psycopg.Error):  # the broker's side: try another node
                    self._node = (self._node + 1) % len(self._nodes)
                delay = backoff.next()
                foreseen = isinstance(exc, psycopg.Error | pika.exceptions.AMQPError | OSError)
                log.warning(
                    "relay interrupted (%s: %s); retrying in %.1fs on %s",
                    type(exc).__name__,
                    exc,
                    delay,
                    where(self._nodes[self._node]),
                    exc_info=not foreseen,
                )
                self._stop.wait(delay)
        log.info("relay stopped")


def _try_lead(db: psycopg.Connection) -> bool | None:
    """Take the leader lock: True if this relay leads now, False if another one does, None on a
    standby. A standby's outbox is a copy: publishing from it, the relay could never mark a row
    and would publish the same rows again and again."""
    row = db.execute(
        # CASE, not AND: the lock must not be taken on a standby (AND may evaluate either side).
        "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_try_advisory_lock(%s) END",
        (LEADER_LOCK,),
    ).fetchone()
    return None if row is None or row[0] is None else bool(row[0])


class _Session:
    """One broker connection's lifetime: all state lives on the pika I/O loop's thread."""

    def __init__(self, relay: Relay, db: psycopg.Connection, params: pika.URLParameters) -> None:
        self.relay, self.settings, self.db, self.params = relay, relay.settings, db, params
        self.conn: SelectConnection | None = None
        self.channel: Any = None
        self.error: BaseException | None = None
        self.ready = False
        self.closing = False
        self.cursor = 0  # fetch rows with id > cursor; moves back for late commits and rescans
        self.pending: ConfirmWindow[_InFlight] = ConfirmWindow()
        self.inflight_ids: set[int] = set()
        self.returned: set[str] = set()
        self.held: set[int] = set()  # nacked or returned rows waiting for their backoff
        self.marking: set[int] = set()  # confirmed, handed to the marker, not yet committed
        self.failure_backoff = Backoff(first=0.5, cap=30.0)
        self.pump_scheduled = False
        # The last pump stopped at the window (or at a row in doubt still unconfirmed), not at
        # the end of the outbox: a confirm makes room, so it pumps again. Otherwise a confirm
        # has nothing to fetch (new rows come with a notification, or the poll).
        self.pump_blocked = False
        self._listener: _Listener | None = None
        self._marker: _Marker | None = None
        self._compactor: _Compactor | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self) -> None:
        self.conn = SelectConnection(
            self.params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )
        try:
            self.conn.ioloop.start()
        finally:
            for helper in (self._listener, self._marker, self._compactor):
                if helper is not None:
                    helper.stop()
        if self.error is not None:
            raise self.error

    def request_stop(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.ioloop.add_callback_threadsafe(self._begin_close)

    def _on_open(self, conn: SelectConnection) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, _conn: SelectConnection, exc: BaseException) -> None:
        self.error = exc if isinstance(exc, Exception) else pika.exceptions.AMQPConnectionError(exc)
        self.conn.ioloop.stop()

    def _on_closed(self, _conn: SelectConnection, reason: BaseException) -> None:
        if not self.closing:
            self.error = pika.exceptions.AMQPConnectionError(f"connection lost: {reason}")
            self._suspect(reason)
        self.conn.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.exchange_declare(
            exchange=self.settings.exchange,
            exchange_type="fanout",
            durable=True,
            callback=lambda _frame: channel.confirm_delivery(
                ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode
            ),
        )

    def _on_confirm_mode(self, _frame: Any) -> None:
        self.ready = True
        self._marker = _Marker(
            self.settings.database_url, self.conn, self._on_marked, self._on_marker_error
        )
        self._marker.start()
        self._listener = _Listener(self.settings.database_url, self.conn, self._on_notify)
        self._listener.start()
        self._schedule_poll()
        if self.settings.retention is not None:
            self._compactor = _Compactor(self.settings, self.relay.stats)
            self._compactor.start()
        self._pump()

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if not self.closing:
            self.error = pika.exceptions.AMQPChannelError(f"channel closed: {reason}")
            self._suspect(reason)
            self.closing = True
            if self.conn.is_open:
                self.conn.close()

    def _begin_close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.ready = False
        if not self.pending:
            self._finish_close()
        else:
            self.conn.ioloop.call_later(self.settings.shutdown_timeout, self._finish_close)

    def _finish_close(self) -> None:
        if self._marker is not None:
            self._marker.stop()  # waits for the marks of everything confirmed so far
        if self.conn.is_open:
            self.conn.close()
        elif not self.conn.is_closing:
            self.conn.ioloop.stop()  # still connecting: nothing in flight to wait for

    def _guard(self, step: Any) -> None:
        """Run a database step; a database failure ends the session (and re-elects)."""
        try:
            step()
        except psycopg.Error as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self.closing = True
        self.ready = False
        if self.conn.is_open:
            self.conn.close()
        else:
            self.conn.ioloop.stop()

    def _suspect(self, reason: BaseException) -> None:
        """The broker closed on us with an error while rows were in flight: the next sessions
        publish those rows one at a time, and a row it closes on while alone in flight is
        counted (and parked after `park_after_closures`)."""
        closed_by_broker = (
            pika.exceptions.ChannelClosedByBroker,
            pika.exceptions.ConnectionClosedByBroker,
        )
        if not isinstance(reason, closed_by_broker) or reason.reply_code in (200, 320):
            return  # a clean close, or the broker shutting down: nobody's fault
        if not self.inflight_ids:
            return
        relay = self.relay
        if relay.careful_until is not None and len(self.inflight_ids) == 1:
            [row_id] = self.inflight_ids
            relay.suspects = {row_id: relay.suspects.get(row_id, 0) + 1}
        relay.careful_until = max(self.inflight_ids | {relay.careful_until or 0})

    # -- publishing --------------------------------------------------------------------------
    def _schedule_pump(self) -> None:
        if not self.pump_scheduled and self.ready:
            self.pump_scheduled = True
            self.conn.ioloop.call_later(0, self._pump)

    def _pump(self) -> None:
        self.pump_scheduled = False
        self._guard(self._pump_rows)

    def _pump_rows(self) -> None:
        while self.ready and not self.closing:
            careful = self.relay.careful_until
            if careful is None:
                limit = min(self.settings.batch, self.settings.window - len(self.pending))
            else:
                limit = 0 if self.pending else 1  # rows in doubt go one at a time
            if limit <= 0:
                self.pump_blocked = True
                break
            self.pump_blocked = False
            rows = self.db.execute(FETCH_SQL, (self.cursor, limit)).fetchall()
            if careful is not None and (not rows or rows[0][0] > careful):
                self.relay.careful_until = None  # past the rows in doubt: the full window
                continue
            for row in rows:
                self._publish_row(*row)
            if rows:
                self.cursor = rows[-1][0]
            if len(rows) < limit:
                break

    def _publish_row(
        self,
        row_id: int,
        event_id: str,
        event_type: str,
        correlation_id: str | None,
        body: str,
        trace_context: str | None,
    ) -> None:
        if row_id in self.inflight_ids or row_id in self.held or row_id in self.marking:
            return
        payload = body.encode()
        properties = event_properties(
            event_id,
            event_type,
            correlation_id,
            # None unless the request was traced (tracing.py)
            tracing.headers_for(trace_context, self.settings.exchange) if trace_context else None,
        )
        why = self._why_park(row_id, payload, properties)
        if why is not None:
            self._park(row_id, event_id, why)
            return
        self.channel.basic_publish(
            exchange=self.settings.exchange,
            routing_key="",
            body=payload,
            properties=properties,
            mandatory=True,
        )
        self.pending.published(_InFlight(row_id, event_id))
        self.inflight_ids.add(row_id)

    def _why_park(self, row_id: int, body: bytes, properties: Any) -> str | None:
        why = unpublishable(body, properties, self.settings.max_body_bytes)
        closures = self.relay.suspects.get(row_id, 0)
        if why is None and closures >= self.settings.park_after_closures:
            why = f"the broker closed the channel {closures} times in a row on it"
        return why

    def _park(self, row_id: int, event_id: str, why: str) -> None:
        """Set a row aside with its reason (the module docstring says what follows)."""
        self.db.execute(PARK_SQL, (why, row_id))
        self.relay.suspects.pop(row_id, None)
        self.relay.stats.parked += 1
        log.error("parked outbox row %d (event %s): %s", row_id, event_id, why)

    def _on_notify(self, min_id: int) -> None:
        # A transaction that committed late may hold ids below the cursor: look again from there.
        self.cursor = min(self.cursor, min_id - 1)
        self._schedule_pump()

    def _schedule_poll(self) -> None:
        def poll() -> None:
            if self.closing:
                return
            self.cursor = 0  # fallback: rescan every unpublished row (a missed notification)
            self._schedule_pump()
            self._schedule_poll()

        self.conn.ioloop.call_later(self.settings.poll_interval, poll)

    def _on_return(self, _channel: Any, _method: Any, props: Any, _body: bytes) -> None:
        # A return precedes the ack of the same message: remember it so the ack does not mark it.
        self.returned.add(props.message_id)

    def _on_confirm(self, frame: Any) -> None:
        acked, items = self.pending.confirmed(frame.method)
        failed, confirmed = [], []
        for item in items:
            self.inflight_ids.discard(item.row_id)
            if acked and item.event_id not in self.returned:
                confirmed.append(item.row_id)
                self.relay.suspects.pop(item.row_id, None)
            else:
                self.returned.discard(item.event_id)
                failed.append(item.row_id)
        if failed:
            self._hold(failed, "nacked" if not acked else "returned as unroutable")
        elif items:
            self.failure_backoff.reset()
        if confirmed:
            self.marking.update(confirmed)
            self._marker.submit(confirmed)
        if self.pump_blocked:  # no empty fetch after every confirm: only when it made room
            self._schedule_pump()
        if self.closing and not self.pending:
            self._finish_close()

    def _hold(self, row_ids: list[int], why: str) -> None:
        self.relay.stats.failed += len(row_ids)
        self.held.update(row_ids)
        delay = self.failure_backoff.next()
        log.warning(
            "%d event(s) %s by the broker; publishing again in %.1fs", len(row_ids), why, delay
        )

        def release() -> None:
            self.held.difference_update(row_ids)
            self.cursor = min(self.cursor, min(row_ids) - 1)
            self._schedule_pump()

        self.conn.ioloop.call_later(delay, release)

    def _on_marked(self, ids: list[int]) -> None:
        self.marking.difference_update(ids)
        stats = self.relay.stats
        stats.published += len(ids)
        stats.last_published_at = time.time()

    def _on_marker_error(self, exc: BaseException) -> None:
        if not self.closing:
            self._fail(exc)


class _Compactor:
    """Deletes superseded outbox rows on its own connection and thread, in batches.

    It never touches the I/O loop, so a long pass cannot stall publishing; a database error
    only pauses it (the next pass starts again from its cursor).
    """

    def __init__(self, settings: RelaySettings, stats: RelayStats) -> None:
        self.settings, self.stats = settings, stats
        self.cursor = 0
        self._stop = StopFlag()
        self._thread = threading.Thread(target=self._run, name="outbox-compactor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.settings.database_url, autocommit=True, application_name=APP_NAME
                ) as db:
                    while not self._stop.is_set():
                        if not self.compact_once(db):
                            self._stop.wait(self.settings.compact_interval)
            except psycopg.Error as exc:
                log.warning("outbox compaction interrupted: %s", exc)
                self._stop.wait(self.settings.compact_interval)

    def compact_once(self, db: psycopg.Connection) -> bool:
        """One batch; True if the cursor moved a whole batch (more may be waiting)."""
        rows = db.execute(
            COMPACT_SCAN_SQL, (self.settings.retention, self.cursor, self.settings.compact_batch)
        ).fetchall()
        ready = []
        for row in rows:
            if not row[4]:  # unpublished or too young: the cursor waits here
                break
            ready.append(row)
        if ready:
            columns = list(zip(*(row[1:4] for row in ready), strict=True))
            deleted = db.execute(COMPACT_DELETE_SQL, [list(c) for c in columns]).rowcount
            self.stats.compacted += max(deleted, 0)
            self.cursor = ready[-1][0]
        return len(ready) == self.settings.compact_batch


class _Marker:
    """Marks confirmed rows published on its own connection, so the I/O loop never waits."""

    def __init__(self, database_url: str, conn: SelectConnection, done: Any, failed: Any) -> None:
        self.database_url, self.conn, self.done, self.failed = database_url, conn, done, failed
        self._queue: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="outbox-marker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, ids: list[int]) -> None:
        self._queue.put(ids)

    def stop(self) -> None:
        """Mark what was submitted, then end the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(30)

    def _run(self) -> None:
        try:
            with psycopg.connect(
                self.database_url, autocommit=True, application_name=APP_NAME
            ) as db:
                db.execute("SET synchronous_commit = off")  # a lost mark only means a re-publish
                while (ids := self._queue.get()) is not None:
                    stopping = False
                    while not self._queue.empty():  # coalesce what arrived meanwhile
                        more = self._queue.get()
                        if more is None:
                            stopping = True
                            break
                        ids.extend(more)
                    with db.transaction():  # one marker at a time: the digests add up
                        db.execute("SELECT pg_advisory_xact_lock(%s)", (MARK_LOCK,))
                        db.execute(MARK_SQL, (ids,))
                    self._post(lambda done=ids: self.done(done))
                    if stopping:
                        return
        except psycopg.Error as exc:
            log.warning("outbox marker lost its connection: %s", exc)
            self._post(lambda err=exc: self.failed(err))

    def _post(self, callback: Any) -> None:
        with contextlib.suppress(Exception):  # the loop is gone: the next session re-publishes
            self.conn.ioloop.add_callback_threadsafe(callback)


class _Listener:
    """LISTEN on its own connection in a thread; wakes the I/O loop with the lowest new id."""

    def __init__(self, database_url: str, conn: SelectConnection, wake: Any) -> None:
        self.database_url, self.conn, self.wake = database_url, conn, wake
        self._stop = StopFlag()
        self._lock = threading.Lock()
        self._lowest: int | None = None
        self._thread = threading.Thread(target=self._run, name="outbox-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        backoff = Backoff(cap=5.0)
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.database_url, autocommit=True, application_name=APP_NAME
                ) as listen:
                    listen.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    backoff.reset()
                    self._post(0)  # catch up on anything committed before LISTEN took effect
                    while not self._stop.is_set():
                        for note in listen.notifies(timeout=0.5):
                            self._post(int(note.payload) if note.payload.isdigit() else 0)
            except psycopg.Error as exc:
                log.warning("outbox listener lost its connection: %s", exc)
                self._stop.wait(backoff.next())

    def _post(self, lowest: int) -> None:
        with self._lock:
            first = self._lowest is None
            self._lowest = lowest if first else min(self._lowest, lowest)
        if first:
            try:
                self.conn.ioloop.add_callback_threadsafe(self._deliver)
            except Exception:  # the loop is closing; the next session rescans anyway
                self._stop.set()

    def _deliver(self) -> None:
        with self._lock:
            lowest, self._lowest = self._lowest, None
        if lowest is not None:
            self.wake(lowest)


def main() -> int:
    """python -m messaging.relay: a relay for any producer, configured from the environment
    (DATABASE_URL, AMQP_URL, EVENTS_EXCHANGE; RELAY_POLL_INTERVAL)."""
    from servicekit.runner import configure_logging, run_until_signalled

    from .settings import BrokerSettings

    class _Settings(BrokerSettings):
        database_url: str
        relay_poll_interval: float = 1.0

    settings = _Settings()
    configure_logging(settings.log_level)
    tracing.configure("relay")
    relay = Relay(
        RelaySettings(
            database_url=settings.database_url,
            amqp_url=settings.amqp_url,
            exchange=settings.events_exchange,
            poll_interval=settings.relay_poll_interval,
        )
    )
    return run_until_signalled(relay)


if __name__ == "__main__":
    raise SystemExit(main())
