"""Integration: a consumer's batch that is not full waits up to its linger for more deliveries
(fewer transactions and acks when events come one at a time), and never longer."""

from __future__ import annotations

import threading

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


def test_a_delivery_that_comes_within_the_linger_joins_the_batch_in_hand(broker):
    batches = Batches()
    # A linger far longer than the test: the batch is applied because it is full, not late.
    lingering = consumer(broker, batches, linger=600.0, max_batch=2)
    with running(lingering):
        wait_until(lingering.attached.is_set, what="consumer attached")
        broker.publish(event(1))
        # Delivered (no longer ready in the queue): the worker waits with it.
        wait_until(lambda: broker.depth(lingering.topology.queue) == 0, what="the first delivered")
        assert batches.all() == []
        broker.publish(event(2))
        wait_until(lambda: batches.all(), what="the batch applied")
        assert batches.all() == [["t1", "t2"]]


def test_a_batch_that_is_not_full_is_applied_once_the_linger_is_over(broker):
    batches = Batches()
    lingering = consumer(broker, batches, linger=0.05, max_batch=500)
    with running(lingering):
        wait_until(lingering.attached.is_set, what="consumer attached")
        broker.publish(event(1))
        wait_until(lambda: batches.all(), what="the lone delivery applied")
        assert batches.all() == [["t1"]]
        wait_until(lambda: lingering.stats.consumed == 1, what="settled")


def test_stopping_ends_the_linger(broker):
    batches = Batches()
    lingering = consumer(broker, batches, linger=600.0, max_batch=500)
    with running(lingering):
        wait_until(lingering.attached.is_set, what="consumer attached")
        broker.publish(event(1))
        wait_until(lambda: broker.depth(lingering.topology.queue) == 0, what="the first delivered")
    # running() joined the consumer: the stop was not held up by the linger's ten minutes
    assert batches.all() in ([], [["t1"]])


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
