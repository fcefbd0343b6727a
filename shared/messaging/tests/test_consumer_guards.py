"""Integration: nothing a message carries stops the consumer, and a store outage is not the
message's fault. Against the real RabbitMQ."""

from __future__ import annotations

import threading
import time

import pika
import pytest
from messaging import Consumer, ConsumerSettings, Envelope, StoreUnavailable
from messaging.deadletters import DeadLetters, dead_reason
from messaging.testing import running, wait_until
from messaging.topology import DELIVERY_LIMIT

pytestmark = pytest.mark.integration


def envelope(entity_id: str, version: int = 1) -> Envelope:
    return Envelope.new(
        event_type="thing.created",
        entity_id=entity_id,
        entity_version=version,
        data={},
        producer="test",
    )


def publish_raw(broker, queue: str, body: bytes, headers=None, **props) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "",
            queue,
            body,
            pika.BasicProperties(delivery_mode=2, headers=headers, **props),
            mandatory=True,
        )
    finally:
        conn.close()


def dead_letters(broker, queue: str) -> list[tuple[object, bytes]]:
    """The dead queue's letters (headers, message id) with their bodies, looked at and given
    back."""
    look = DeadLetters(broker.amqp_url, queue).look(keep_body=lambda _letter, _body: True)
    return [(letter, letter.body) for letter in look.letters]


class Applied:
    def __init__(self, fail_on: set[str] | None = None) -> None:
        self.ids: list[str] = []
        self.fail_on = fail_on or set()

    def __call__(self, env: Envelope) -> None:
        if env.entity_id in self.fail_on:
            raise ValueError(f"{env.entity_id} always fails")
        self.ids.append(env.entity_id)


def consumer_for(broker, handler, **settings) -> Consumer:
    topology = broker.topology("guard", retry_delays=(0.2, 0.4))
    return Consumer(ConsumerSettings(broker.amqp_url, topology, **settings), handler)


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(b"not json", {"x-death": 5}, id="x-death-an-integer"),
        pytest.param(b"not json", {"x-death": [{"count": "3", "queue": "q"}]}, id="count-text"),
        pytest.param(b"not json", {"x-death": ["junk"]}, id="entry-not-a-table"),
        pytest.param(b"not json", {"x-attempts": "5"}, id="x-attempts-text"),
        pytest.param(b"{}", {"x-attempts": True, "x-first-failure-at": 7}, id="odd-types"),
        pytest.param(envelope("fails").to_json(), {"x-death": 5}, id="a-failing-handler"),
    ],
)
def test_a_message_that_cannot_be_judged_is_dead_lettered_and_the_queue_keeps_flowing(
    broker, body, headers
):
    applied = Applied(fail_on={"fails"})
    consumer = consumer_for(broker, applied)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        publish_raw(broker, consumer.topology.queue, body, headers)
        broker.publish(envelope("after"))
        wait_until(lambda: "after" in applied.ids, what="the next message applied")
        [(props, _)] = wait_until(
            lambda: dead_letters(broker, consumer.topology.dead_queue), what="the dead letter"
        )
        assert consumer.health() is None
    reason = props.headers["x-dead-reason"]
    assert reason.startswith("cannot judge the message") or "DecodeError" in reason


def test_a_message_redelivered_too_often_is_dead_lettered_before_it_reaches_the_handler(broker):
    applied = Applied()
    consumer = consumer_for(broker, applied)
    consumer.topology.declare(pika.BlockingConnection(pika.URLParameters(broker.amqp_url)))
    publish_raw(broker, consumer.topology.queue, envelope("killer").to_json())
    for _ in range(10):  # ten consumers that died holding it
        conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
        method, _, _ = conn.channel().basic_get(consumer.topology.queue)
        assert method is not None
        conn.close()
    with running(consumer):
        [(props, _)] = wait_until(
            lambda: dead_letters(broker, consumer.topology.dead_queue), what="the dead letter"
        )
    assert "delivered 11 times without being settled" in props.headers["x-dead-reason"]
    assert applied.ids == []


def test_the_broker_itself_dead_letters_past_its_delivery_limit_with_a_readable_reason(broker):
    topology = broker.topology("limit")
    conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    topology.declare(conn)
    conn.close()
    publish_raw(broker, topology.queue, b"crashes every consumer")
    for _ in range(DELIVERY_LIMIT + 1):
        conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
        method, _, _ = conn.channel().basic_get(topology.queue)
        conn.close()
        if method is None:
            break
    [(props, _)] = wait_until(lambda: dead_letters(broker, topology.dead_queue), what="dead")
    assert dead_reason(props.headers).startswith("delivery limit")


def test_looking_at_dead_letters_never_consumes_them(broker):
    topology = broker.topology("look")
    conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    topology.declare(conn)
    conn.close()
    publish_raw(broker, topology.dead_queue, b"dead", {"x-dead-reason": "r"}, message_id="d-1")
    for _ in range(DELIVERY_LIMIT + 5):
        # A look gives its window back as its channel closes, which the broker finishes after
        # the look returns: the next look may begin before the letter is back (a loaded run's
        # did, and saw none), so each waits to find it, however many looks that takes.
        [(props, body)] = wait_until(
            lambda: dead_letters(broker, topology.dead_queue), what="the letter, looked at again"
        )
    assert (props.message_id, body) == ("d-1", b"dead")


class FlakyStore:
    """A handler and a probe over a store that a test takes away and brings back."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.applied: list[str] = []
        self.probes = 0

    def handle(self, env: Envelope) -> None:
        if self.down.is_set():
            raise StoreUnavailable("the store does not answer")
        self.applied.append(env.entity_id)

    def probe(self) -> None:
        self.probes += 1
        if self.down.is_set():
            raise ConnectionError("still away")


def test_a_store_outage_longer_than_the_retry_ladder_pauses_consuming_and_dead_letters_nothing(
    broker,
):
    store = FlakyStore()
    topology = broker.topology("outage", retry_delays=(0.2, 0.4))
    consumer = Consumer(
        ConsumerSettings(broker.amqp_url, topology), store.handle, probe=store.probe
    )
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        store.down.set()
        broker.publish(*[envelope(f"o{n}") for n in range(30)])
        wait_until(consumer.paused.is_set, what="the consumer paused")
        assert consumer.health().startswith("paused: the store is away or refuses writes")
        ladder_over = time.monotonic() + 3 * sum(topology.retry_delays)
        wait_until(lambda: time.monotonic() > ladder_over and store.probes >= 3, what="outage")
        assert store.applied == [] and broker.depth(topology.dead_queue) == 0  # held, not dead
        store.down.clear()
        wait_until(lambda: len(set(store.applied)) == 30, what="everything applied after")
        assert consumer.health() is None
    assert broker.depth(topology.dead_queue) == 0
    assert all(broker.depth(q) == 0 for q in topology.retry_queues)
    assert consumer.stats.retried == 0 and consumer.stats.dead_lettered == 0


def test_a_handler_that_stops_making_progress_makes_the_consumer_unhealthy(broker):
    release = threading.Event()

    def stuck(_env: Envelope) -> None:
        release.wait(30)

    consumer = consumer_for(broker, stuck, stall_after=0.3)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        broker.publish(envelope("slow"), envelope("behind"))
        wait_until(lambda: (consumer.health() or "").startswith("stalled"), what="stalled")
        release.set()
        wait_until(lambda: consumer.health() is None, what="healthy again")


def test_a_worker_that_died_is_replaced_and_the_queue_keeps_flowing(broker):
    applied = Applied()
    consumer = consumer_for(broker, applied)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        dead = threading.Thread(target=lambda: None)
        dead.start()
        dead.join()
        original, consumer._worker = consumer._worker, dead  # as if it had died
        assert consumer.health() == "the consumer's worker is not running"
        broker.publish(envelope("later"))
        wait_until(lambda: "later" in applied.ids, what="applied by the new worker")
        assert consumer._worker is not dead
        consumer._stop.set()
        original.join(5)
