"""Integration: a consumer's batch that is not full waits up to its linger for more deliveries
(fewer transactions and acks when events come one at a time), and never longer."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
from messaging import Consumer, ConsumerSettings, Envelope
from messaging.handlers import Handlers
from messaging.testing import running, wait_until

pytestmark = pytest.mark.integration


def event(n: int) -> Envelope:
    return Envelope.new(
        event_type="thing.updated", entity_id=f"t{n}", entity_version=1, data={}, producer="t"
    )


class Batches:
    """An apply that records each batch it was given (the entity ids)."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, changes: list[str]) -> None:
        with self.lock:
            self.seen.append(list(changes))

    def all(self) -> list[list[str]]:
        with self.lock:
            return list(self.seen)


def consumer(broker, batches: Batches, linger: float, max_batch: int) -> Consumer:
    settings = ConsumerSettings(
        broker.amqp_url, broker.topology("svc"), max_batch=max_batch, linger=linger
    )
    return Consumer(settings, Handlers.every(lambda envelope: envelope.entity_id), batches)


@contextlib.contextmanager
def first_published(broker, linger: float, max_batch: int) -> Iterator[tuple[Consumer, Batches]]:
    """A consumer with this linger, running, attached, and one event published to it."""
    batches = Batches()
    lingering = consumer(broker, batches, linger, max_batch)
    with running(lingering):
        wait_until(lingering.attached.is_set, what="consumer attached")
        broker.publish(event(1))
        yield lingering, batches


def delivered(broker, lingering: Consumer) -> None:
    """Wait until the broker has delivered what was published (none ready in the queue)."""
    wait_until(lambda: broker.depth(lingering.topology.queue) == 0, what="delivered")


def test_a_delivery_that_comes_within_the_linger_joins_the_batch_in_hand(broker):
    # A linger far longer than the test: the batch is applied because it is full, not late.
    with first_published(broker, linger=600.0, max_batch=2) as (lingering, batches):
        delivered(broker, lingering)  # the worker waits with it
        assert batches.all() == []
        broker.publish(event(2))
        wait_until(lambda: batches.all(), what="the batch applied")
        assert batches.all() == [["t1", "t2"]]


def test_a_batch_that_is_not_full_is_applied_once_the_linger_is_over(broker):
    with first_published(broker, linger=0.05, max_batch=500) as (lingering, batches):
        wait_until(lambda: batches.all(), what="the lone delivery applied")
        assert batches.all() == [["t1"]]
        wait_until(lambda: lingering.stats.consumed == 1, what="settled")


def test_a_stop_during_the_linger_settles_the_batch_in_hand_or_leaves_it_unapplied(broker):
    """Stopping ends the wait (well before the linger's ten minutes and the stop's minute),
    and the batch in hand is either applied and acked or not applied and back in the queue:
    never applied and then delivered again."""
    batches = Batches()
    settings = ConsumerSettings(
        broker.amqp_url, broker.topology("svc"), linger=600.0, shutdown_timeout=60.0
    )
    lingering = Consumer(settings, Handlers.every(lambda e: e.entity_id), batches)
    thread = threading.Thread(target=lingering.run, daemon=True)
    thread.start()
    try:
        wait_until(lingering.attached.is_set, what="consumer attached")
        broker.publish(event(1))
        delivered(broker, lingering)
        lingering._post(lambda: None)  # wake the connection thread as any event would
    finally:
        lingering.stop()
        thread.join(30)  # running() would wait as long; the linger and the stop's limit longer
    assert not thread.is_alive(), "the stop waited for the linger"
    back = broker.depth(lingering.topology.queue)
    assert (batches.all(), back) in (([["t1"]], 0), ([], 1))


@pytest.mark.unit
@pytest.mark.parametrize("wrong", [-0.1, float("nan"), float("inf")])
def test_a_linger_that_is_not_a_finite_wait_is_refused(wrong):
    from messaging.topology import Topology

    with pytest.raises(ValueError, match="linger"):
        ConsumerSettings("amqp://x/%2F", Topology("svc", "x", (0.2,)), linger=wrong)


@pytest.mark.unit
@pytest.mark.parametrize("wrong", ["-0.1", "2", "nan", "soon"])
def test_the_linger_setting_is_refused_outside_zero_to_one_second(monkeypatch, wrong):
    from messaging.settings import BrokerSettings
    from pydantic import ValidationError

    monkeypatch.setenv("CONSUMER_LINGER_SECONDS", wrong)
    with pytest.raises(ValidationError, match="consumer_linger_seconds"):
        BrokerSettings(events_exchange="x")
    monkeypatch.setenv("CONSUMER_LINGER_SECONDS", "0")
    assert BrokerSettings(events_exchange="x").consumer_linger_seconds == 0
