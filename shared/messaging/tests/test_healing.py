"""Integration: a read model that lost its store asks the producer for a replay, through the
broker, and the producer's ReplayServer answers it."""

from __future__ import annotations

import pika
import psycopg
import pytest
from messaging import Consumer, ConsumerSettings, Envelope, Outbox
from messaging.connection import connect
from messaging.healing import READY, REBUILDING, Generation, Healing
from messaging.replay import (
    COMPLETED_TYPE,
    REQUEST_HEADER,
    declare_requests,
    replay,
)
from messaging.replay_server import ReplayServer
from messaging.testing import MemoryGeneration, running, wait_until
from replay_requests import take_requests

pytestmark = pytest.mark.integration


def test_a_store_without_a_marker_asks_once_and_is_ready_after_the_completion(broker):
    store = MemoryGeneration()
    healing = Healing(store, broker.amqp_url, broker.exchange, "model.q")

    assert healing.check() == REBUILDING
    assert healing.check() == REBUILDING  # asked already: not again before re_request_after

    [request] = take_requests(broker.amqp_url, broker.exchange)
    assert request["queue"] == "model.q"
    healing.completed("some other request", 0)
    assert store.marker.state == REBUILDING
    healing.completed(request["request_id"], 0)
    assert healing.check() == READY


class Racing(MemoryGeneration):
    """A store whose marker the replicas all read as missing before any of them writes it."""

    def __init__(self, unseen: int) -> None:
        super().__init__()
        self.unseen = unseen

    def generation(self) -> Generation | None:
        if self.unseen:
            self.unseen -= 1
            return None
        return self.marker


def test_replicas_that_all_find_the_marker_missing_ask_once(broker):
    store = Racing(unseen=3)
    replicas = [Healing(store, broker.amqp_url, broker.exchange, "model.q") for _ in range(3)]
    assert [healing.check() for healing in replicas] == [REBUILDING] * 3
    [request] = take_requests(broker.amqp_url, broker.exchange)
    replicas[2].completed(request["request_id"], 0)
    assert [healing.check() for healing in replicas] == [READY] * 3


class Overtaken(MemoryGeneration):
    """A store where another party writes a rebuild of its own just after the claim."""

    def claim_rebuild(self, request_id: str) -> bool:
        claimed = super().claim_rebuild(request_id)
        self.begin_rebuild("theirs", 1.0)
        return claimed


def test_a_marker_rewritten_after_the_claim_is_left_to_whoever_wrote_it(broker):
    conn = connect(broker.amqp_url, "test")
    try:
        declare_requests(conn, broker.exchange)  # where a request would wait
    finally:
        conn.close()
    store = Overtaken()
    healing = Healing(store, broker.amqp_url, broker.exchange, "model.q")
    assert healing.check() == REBUILDING
    assert (store.marker.request_id, store.marker.since) == ("theirs", 1.0)  # not overwritten
    assert take_requests(broker.amqp_url, broker.exchange) == []  # and not asked for here
    healing.completed("theirs", 0)
    assert healing.check() == READY


def test_a_request_that_got_no_answer_is_sent_again(broker):
    store = MemoryGeneration()
    healing = Healing(store, broker.amqp_url, broker.exchange, "model.q", re_request_after=0)
    healing.check()
    healing.check()
    first, second = take_requests(broker.amqp_url, broker.exchange)
    assert first["request_id"] == second["request_id"]


def test_the_replay_server_sends_the_latest_events_and_then_the_completion(producer_db, broker):
    outbox = Outbox("test")
    with psycopg.connect(producer_db) as conn:
        for entity_id in ("a", "a", "b"):
            with conn.transaction(), conn.cursor() as cur:
                outbox.add(cur, event_type="thing.updated", entity_id=entity_id, data={})
    seen: list[tuple[str, int]] = []
    store = MemoryGeneration()
    topology = broker.topology("healed")
    healing = Healing(store, broker.amqp_url, broker.exchange, topology.queue)
    consumer = Consumer(
        ConsumerSettings(broker.amqp_url, topology),
        lambda env: seen.append((env.entity_id, env.entity_version)),
        healing=healing,
    )
    server = ReplayServer(producer_db, broker.amqp_url, broker.exchange, [topology.queue])
    with running(consumer), running(server):
        wait_until(consumer.attached.is_set, what="attached")
        assert healing.check() == REBUILDING
        wait_until(lambda: store.marker.state == READY, timeout=30, what="the rebuild done")
    assert sorted(seen) == [("a", 2), ("b", 1)]
    assert consumer.stats.dead_lettered == 0


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"queue": 5, "request_id": "r"}', b'{"queue": "missing.q"}'],
)
def test_a_request_that_is_not_one_is_dropped_and_the_server_goes_on(producer_db, broker, body):
    topology = broker.topology("after-bad")
    conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    topology.declare(conn)
    conn.channel().basic_publish("", declare_requests(conn, broker.exchange), body)
    conn.close()
    server = ReplayServer(
        producer_db, broker.amqp_url, broker.exchange, [topology.queue, "missing.q"]
    )
    store = MemoryGeneration()
    healing = Healing(store, broker.amqp_url, broker.exchange, topology.queue)
    consumer = Consumer(
        ConsumerSettings(broker.amqp_url, topology), lambda env: None, healing=healing
    )
    with running(server), running(consumer):
        healing.check()
        wait_until(lambda: store.marker.state == READY, timeout=30, what="the good request served")


def test_a_completion_message_never_reaches_the_handler(broker):
    handled: list[Envelope] = []
    topology = broker.topology("control")
    consumer = Consumer(ConsumerSettings(broker.amqp_url, topology), handled.append)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
        conn.channel().basic_publish(
            "", topology.queue, b'{"request_id": "x"}', pika.BasicProperties(type=COMPLETED_TYPE)
        )
        conn.close()
        wait_until(lambda: broker.depth(topology.queue) == 0, what="acknowledged")
    assert handled == [] and consumer.stats.dead_lettered == 0


def test_every_replayed_event_carries_the_request_it_answers(producer_db, broker):
    with psycopg.connect(producer_db) as conn:
        for entity_id in ("a", "b"):
            with conn.transaction(), conn.cursor() as cur:
                Outbox("test").add(cur, event_type="thing.created", entity_id=entity_id, data={})
    queue = declared_queue(broker, "tagged")
    assert replay(producer_db, broker.amqp_url, queue, request_id="req-7") == 2
    by_hand = replay(producer_db, broker.amqp_url, queue)
    assert by_hand == 2
    messages = drained(broker, queue)
    tagged = [m for m in messages[:3] if m[0].type != COMPLETED_TYPE]
    assert [p.headers[REQUEST_HEADER] for p, _ in tagged] == ["req-7", "req-7"]
    assert all("x-replayed-at" in p.headers for p, _ in tagged)
    assert messages[2][0].type == COMPLETED_TYPE
    assert all(REQUEST_HEADER not in p.headers for p, _ in messages[3:])  # nobody asked


def declared_queue(broker, service: str) -> str:
    """A work queue of this test's own, declared as a consuming service would."""
    topology = broker.topology(service)
    conn = connect(broker.amqp_url, "test-declare")
    try:
        topology.declare(conn)
    finally:
        conn.close()
    return topology.queue


def drained(broker, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message of the queue, taken off it, in order."""
    conn = connect(broker.amqp_url, "test-drain")
    try:
        channel, found = conn.channel(), []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((properties, body))
    finally:
        conn.close()
