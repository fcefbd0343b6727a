"""Integration: outbox -> relay -> RabbitMQ -> consumer runtime, against the real servers."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from delivered import unpublished
from messaging import Consumer, ConsumerSettings, Envelope, Outbox, Relay, RelaySettings
from messaging.testing import running, wait_until

pytestmark = pytest.mark.integration


class Recorder:
    """A handler that remembers what it saw, in order."""

    def __init__(self) -> None:
        self.seen: list[Envelope] = []
        self.lock = threading.Lock()

    def __call__(self, envelope: Envelope) -> None:
        with self.lock:
            self.seen.append(envelope)

    def versions(self, entity_id: str) -> list[int]:
        with self.lock:
            return [e.entity_version for e in self.seen if e.entity_id == entity_id]


def relay_for(db: str, broker) -> Relay:
    return Relay(
        RelaySettings(
            database_url=db, amqp_url=broker.amqp_url, exchange=broker.exchange, poll_interval=0.5
        )
    )


def consumer_for(broker, handler, service: str = "svc") -> Consumer:
    topology = broker.topology(service)
    return Consumer(ConsumerSettings(amqp_url=broker.amqp_url, topology=topology), handler)


def write_changes(db: str, entity_id: str, count: int, per_tx: int = 1) -> None:
    outbox = Outbox("test")
    with psycopg.connect(db) as conn:
        for start in range(0, count, per_tx):
            with conn.transaction(), conn.cursor() as cur:
                for n in range(start, min(start + per_tx, count)):
                    outbox.add(cur, event_type="thing.updated", entity_id=entity_id, data={"n": n})


def test_thousand_changes_of_one_entity_arrive_in_version_order(producer_db, broker):
    recorder = Recorder()
    consumer = consumer_for(broker, recorder)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="consumer attached")
        with running(relay_for(producer_db, broker)):
            write_changes(producer_db, "e1", 1000, per_tx=7)
            wait_until(lambda: len(recorder.versions("e1")) >= 1000, what="1000 deliveries")
            wait_until(lambda: unpublished(producer_db) == 0, what="all rows marked")
    assert recorder.versions("e1") == list(range(1, 1001))


def test_relay_publishes_nothing_for_a_rolled_back_write(producer_db, broker):
    recorder = Recorder()
    consumer = consumer_for(broker, recorder)
    with running(consumer), running(relay_for(producer_db, broker)):
        wait_until(consumer.attached.is_set, what="consumer attached")
        outbox = Outbox("test")
        with psycopg.connect(producer_db) as conn:
            with pytest.raises(RuntimeError), conn.transaction(), conn.cursor() as cur:
                outbox.add(cur, event_type="thing.created", entity_id="gone", data={})
                raise RuntimeError("the write fails after the event was added")
            with conn.transaction(), conn.cursor() as cur:
                outbox.add(cur, event_type="thing.created", entity_id="kept", data={})
        wait_until(lambda: recorder.versions("kept"), what="the committed event")
    assert recorder.versions("gone") == []
    assert recorder.versions("kept") == [1]


def test_heartbeats_keep_the_connection_through_a_long_handler(broker):
    handled = []

    def slow(envelope: Envelope) -> None:
        # Work that outlasts several heartbeat intervals (the broker drops a connection that
        # misses two): the I/O thread must keep answering while this runs.
        time.sleep(4)
        handled.append(envelope.entity_id)

    topology = broker.topology("slow")
    settings = ConsumerSettings(amqp_url=broker.amqp_url, topology=topology, heartbeat=1)
    consumer = Consumer(settings, slow)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="consumer attached")
        broker.publish(
            Envelope.new(
                event_type="thing.created",
                entity_id="long",
                entity_version=1,
                data={},
                producer="test",
            ),
        )
        wait_until(lambda: handled, timeout=30, what="the slow handler")
    assert broker.depth(topology.queue) == 0  # acked: nothing came back on close
    assert handled == ["long"]
    assert consumer.stats.connections == 1


def test_a_full_window_is_refilled_by_the_confirms_alone(producer_db, broker):
    """A confirm fetches again only when the last fetch stopped at the window: with a window of
    3, no notification (the rows predate the relay) and no poll within the test, every row of a
    backlog still goes out, in order."""
    write_changes(producer_db, "w1", 200, per_tx=200)
    recorder = Recorder()
    consumer = consumer_for(broker, recorder)
    relay = Relay(
        RelaySettings(
            database_url=producer_db,
            amqp_url=broker.amqp_url,
            exchange=broker.exchange,
            window=3,
            poll_interval=600,
        )
    )
    with running(consumer):
        wait_until(consumer.attached.is_set, what="consumer attached")
        with running(relay):
            wait_until(lambda: len(recorder.versions("w1")) >= 200, what="200 deliveries")
            wait_until(lambda: unpublished(producer_db) == 0, what="all rows marked")
    assert recorder.versions("w1") == list(range(1, 201))
