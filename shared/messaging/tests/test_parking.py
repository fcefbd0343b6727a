"""No outbox row holds back the rows behind it: a row the broker cannot take is parked with its
reason, the relay goes on, and the operator gives it back after a fix. And nothing ends the
relay. Against the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from messaging import Consumer, ConsumerSettings, Envelope, Outbox, Relay, RelaySettings
from messaging import outbox as outbox_module
from messaging import relay as relay_module
from messaging.connection import connect
from messaging.testing import running, wait_until

pytestmark = pytest.mark.integration

UNTRAVELLED = "é" * 180  # 360 bytes in UTF-8: no AMQP short string can carry it


class Seen:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, envelope: Envelope) -> None:
        with self.lock:
            self.events.append((envelope.entity_id, envelope.entity_version))

    def has(self, *events: tuple[str, int]) -> bool:
        with self.lock:
            return all(event in self.events for event in events)


def add(db: str, entity_id: str, **fields) -> int:
    """An outbox row as the producer writes it, then changed as a hostile writer might."""
    with psycopg.connect(db) as conn, conn.cursor() as cur:
        envelope = Outbox("test").add(
            cur, event_type="thing.updated", entity_id=entity_id, data={"n": 1}
        )
        for column, value in fields.items():
            cur.execute(
                f"UPDATE messaging_outbox SET {column} = %s WHERE event_id = %s",
                (value, envelope.event_id),
            )
        return cur.execute(
            "SELECT id FROM messaging_outbox WHERE event_id = %s", (envelope.event_id,)
        ).fetchone()[0]


def parked(db: str) -> list[dict]:
    with psycopg.connect(db) as conn:
        return outbox_module.parked(conn)


def relay_for(db: str, broker, **settings) -> Relay:
    return Relay(RelaySettings(db, broker.amqp_url, broker.exchange, poll_interval=0.2, **settings))


@pytest.fixture
def consumer(broker):
    seen = Seen()
    consumer = Consumer(ConsumerSettings(broker.amqp_url, broker.topology("svc")), seen)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="the consumer attached")
        yield seen


def test_a_row_whose_correlation_id_cannot_travel_is_parked_and_the_rows_behind_it_flow(
    producer_db, broker, consumer
):
    add(producer_db, "before")
    bad = add(producer_db, "bad", correlation_id=UNTRAVELLED)
    add(producer_db, "after")
    add(producer_db, "bad")  # the bad entity's next version: it carries the whole state
    with running(relay_for(producer_db, broker)):
        wait_until(lambda: consumer.has(("before", 1), ("after", 1), ("bad", 2)), what="flow")
        [row] = wait_until(  # once the newer version is marked published, the row says so
            lambda: [r for r in parked(producer_db) if r["superseded_by"]], what="the parked row"
        )
        assert row["id"] == bad
        assert "ShortStringTooLong" in row["parked_reason"]
        assert row["superseded_by"] == 2
        assert ("bad", 1) not in consumer.events
        with psycopg.connect(producer_db) as conn:
            assert outbox_module.backlog(conn)[0] == 0  # a parked row is not waiting
            assert outbox_module.parked_count(conn) == 1
            # The fix (here: a correlation id that travels), then the operator's retry.
            conn.execute(
                "UPDATE messaging_outbox SET correlation_id = 'fixed' WHERE id = %s", (bad,)
            )
            assert outbox_module.unpark(conn, [bad]) == 1
        wait_until(lambda: consumer.has(("bad", 1)), what="the parked row sent after the fix")
    assert parked(producer_db) == []


def test_a_body_past_the_limit_consumers_accept_is_parked(producer_db, broker, consumer):
    big = add(producer_db, "big", body="x" * 2000)
    add(producer_db, "small")
    with running(relay_for(producer_db, broker, max_body_bytes=1000)):
        wait_until(lambda: consumer.has(("small", 1)), what="the row behind it")
        [row] = wait_until(lambda: parked(producer_db), what="the parked row")
    assert row["id"] == big
    assert "2000 bytes, over the 1000-byte limit" in row["parked_reason"]


def test_a_row_the_broker_closes_the_channel_on_is_parked_after_a_few_closures(
    producer_db, broker, consumer, monkeypatch
):
    """The broker refuses some messages by closing the channel (an expiration it cannot read,
    a message past its size limit): the rows in doubt go one at a time until the culprit is
    known, and it is parked after `park_after_closures` closures; the others flow."""
    for n in range(5):
        add(producer_db, f"early-{n}")
    culprit = add(producer_db, "culprit")
    for n in range(5):
        add(producer_db, f"late-{n}")
    with psycopg.connect(producer_db) as conn:
        culprit_event = conn.execute(
            "SELECT event_id::text FROM messaging_outbox WHERE id = %s", (culprit,)
        ).fetchone()[0]
    real = relay_module.event_properties

    def refused_by_the_broker(event_id, *args, **kwargs):
        properties = real(event_id, *args, **kwargs)
        if event_id == culprit_event:
            properties.expiration = "never"  # RabbitMQ closes the channel: PRECONDITION_FAILED
        return properties

    monkeypatch.setattr(relay_module, "event_properties", refused_by_the_broker)
    relay = relay_for(producer_db, broker)
    with running(relay):
        everyone = [(f"early-{n}", 1) for n in range(5)] + [(f"late-{n}", 1) for n in range(5)]
        wait_until(lambda: consumer.has(*everyone), what="every other row", timeout=60)
        [row] = wait_until(lambda: parked(producer_db), what="the parked culprit", timeout=60)
    assert row["id"] == culprit
    assert "closed the channel 3 times" in row["parked_reason"]
    assert ("culprit", 1) not in consumer.events
    assert relay.careful_until is None


def test_no_exception_of_any_class_ends_the_relay(producer_db, broker, consumer, monkeypatch):
    real, failures = relay_module._try_lead, []

    def odd_failure(db):
        if len(failures) < 2:
            failures.append(1)
            raise ZeroDivisionError("a bug of ours, say")
        return real(db)

    monkeypatch.setattr(relay_module, "_try_lead", odd_failure)
    add(producer_db, "one")
    relay = relay_for(producer_db, broker)
    with running(relay):
        wait_until(lambda: consumer.has(("one", 1)), what="published after two odd failures")
    assert len(failures) == 2


@pytest.mark.unit
def test_the_envelope_refuses_a_correlation_id_that_could_not_travel():
    with pytest.raises(ValueError, match="correlation_id"):
        Envelope.new(
            event_type="thing.created",
            entity_id="t",
            entity_version=1,
            data={},
            producer="test",
            correlation_id=UNTRAVELLED,
        )
    travels = Envelope.new(
        event_type="thing.created",
        entity_id="t",
        entity_version=1,
        data={},
        producer="test",
        correlation_id=str(uuid.uuid4()),
        occurred_at=datetime.now(UTC),
    )
    assert travels.correlation_id


def test_the_operators_command_lists_parked_rows_and_gives_them_back(
    producer_db, broker, consumer, capsys
):
    from messaging.cli import main

    bad = add(producer_db, "bad", correlation_id=UNTRAVELLED)
    with running(relay_for(producer_db, broker)):
        wait_until(lambda: parked(producer_db), what="the parked row")
        assert main(["--database-url", producer_db, "outbox", "status"]) == 0
        out = capsys.readouterr().out
        assert "parked: 1" in out
        assert f"#{bad} thing.updated bad v1" in out and "ShortStringTooLong" in out
        with psycopg.connect(producer_db) as conn:
            conn.execute("UPDATE messaging_outbox SET correlation_id = NULL WHERE id = %s", (bad,))
        assert main(["--database-url", producer_db, "outbox", "retry", str(bad)]) == 0
        assert "gave 1 parked row(s) back" in capsys.readouterr().out
        wait_until(lambda: consumer.has(("bad", 1)), what="published after the retry")
    assert main(["--database-url", producer_db, "outbox", "retry", "--all"]) == 0
    assert "gave 0 parked row(s) back" in capsys.readouterr().out


def test_a_relay_whose_database_name_does_not_resolve_waits_and_then_publishes(
    producer_db, broker, consumer
):
    """The database's name gone (a failed-over primary's, say): the relay backs off and tries
    again, it does not end; with the name back it publishes what waited."""
    gone = psycopg.conninfo.make_conninfo(producer_db, host="db-gone.invalid")
    relay = relay_for(gone, broker)
    add(producer_db, "waited")
    with running(relay) as thread:
        over = threading.Event()
        threading.Timer(2.0, over.set).start()
        wait_until(over.is_set, what="two seconds of a name that does not resolve")
        assert thread.is_alive() and not relay.is_leader.is_set()
    with running(relay_for(producer_db, broker)):
        wait_until(lambda: consumer.has(("waited", 1)), what="published once it resolves")


def test_a_replay_skips_a_row_the_broker_cannot_take_and_sends_the_rest(producer_db, broker):
    """A replay (self-healing, a rebuild) must not fail on one row: the latest *published*
    state of a parked row's entity is sent, and a row that would fail is skipped."""
    from messaging.replay import replay

    queue = broker.topology("replayed").queue
    conn = connect(broker.amqp_url, "parking-test")
    try:
        broker.topologies[-1].declare(conn)
    finally:
        conn.close()
    add(producer_db, "fine")
    add(producer_db, "untravelled", correlation_id=UNTRAVELLED)  # never parked: not published
    assert replay(producer_db, broker.amqp_url, queue) == 1
    assert broker.depth(queue) == 1
