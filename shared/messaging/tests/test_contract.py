"""Contract: the in-memory bus and the real consumer runtime over RabbitMQ behave the same.

Every test runs twice through the `harness` fixture: once against messaging.testing.InMemoryBus
(unit, virtual clock) and once against messaging.Consumer on a real broker (integration). Each
harness offers the same small interface, so a test states the contract once.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Protocol

import pika
import pytest
from messaging import (
    Consumer,
    ConsumerSettings,
    Envelope,
    Handlers,
    PermanentError,
    RetryableError,
    Topology,
)
from messaging.processing import ConsumerStats
from messaging.testing import InMemoryBus, Message, running, wait_until

RETRY_DELAYS = (0.2, 0.4)
ATTEMPTS = 1 + len(RETRY_DELAYS)
SETTLE_TIMEOUT = 20.0

Handler = Callable[[Envelope], None]
DeadLetter = tuple[bytes, dict[str, Any]]


class Harness(Protocol):
    topology: Topology

    def start(self, handler: Handler | Handlers) -> None: ...
    def stats(self) -> ConsumerStats: ...
    def publish(
        self, body: bytes, message_id: str | None = None, type: str | None = None
    ) -> None: ...
    def settle(self, predicate: Callable[[], Any], what: str) -> None: ...
    def dead_letters(self) -> list[DeadLetter]: ...
    def clock(self) -> float: ...
    def close(self) -> None: ...


class MemoryHarness:
    """The fake: nothing moves until settle(), which runs the bus (and its clock) to idle."""

    def __init__(self) -> None:
        self.topology = Topology("contract", "test-exchange", RETRY_DELAYS)
        self.bus = InMemoryBus()

    def start(self, handler: Handler | Handlers) -> None:
        self.bus.subscribe(self.topology, handler)

    def stats(self) -> ConsumerStats:
        return self.bus.stats(self.topology.queue)

    def publish(self, body: bytes, message_id: str | None = None, type: str | None = None) -> None:
        self.bus.publish(Message(body, message_id, type))

    def settle(self, predicate: Callable[[], Any], what: str) -> None:
        self.bus.run_until_idle()
        assert predicate(), f"the bus went idle without {what}"

    def dead_letters(self) -> list[DeadLetter]:
        return [(m.body, dict(m.headers)) for m in self.bus.dead_letters(self.topology.queue)]

    def clock(self) -> float:
        return self.bus.now

    def close(self) -> None:
        pass


class RabbitHarness:
    """The real thing: messaging.Consumer on its own thread, raw publishes with confirms."""

    def __init__(self, broker: Any) -> None:
        self.amqp_url = broker.amqp_url
        self.exchange = broker.exchange
        self.topology = broker.topology("contract", RETRY_DELAYS)
        self._stack = contextlib.ExitStack()
        self._dead: list[DeadLetter] = []
        self._channel: Any = None

    def start(self, handler: Handler | Handlers) -> None:
        consumer = self.consumer = Consumer(ConsumerSettings(self.amqp_url, self.topology), handler)
        self._stack.enter_context(running(consumer))
        wait_until(consumer.attached.is_set, timeout=SETTLE_TIMEOUT, what="consumer attached")
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        self._stack.callback(lambda: conn.close() if conn.is_open else None)
        self._channel = conn.channel()
        self._channel.confirm_delivery()

    def publish(self, body: bytes, message_id: str | None = None, type: str | None = None) -> None:
        self._channel.basic_publish(
            exchange=self.exchange,
            routing_key="",
            body=body,
            properties=pika.BasicProperties(
                message_id=message_id,
                type=type,
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
            ),
            mandatory=True,
        )

    def settle(self, predicate: Callable[[], Any], what: str) -> None:
        wait_until(predicate, timeout=SETTLE_TIMEOUT, what=what)
        wait_until(self._queues_empty, timeout=SETTLE_TIMEOUT, what="work and retry queues empty")

    def _queues_empty(self) -> bool:
        for name in (self.topology.queue, *self.topology.retry_queues):
            declared = self._channel.queue_declare(queue=name, passive=True)
            if declared.method.message_count:
                return False
        return True

    def dead_letters(self) -> list[DeadLetter]:
        while True:
            method, properties, body = self._channel.basic_get(
                self.topology.dead_queue, auto_ack=True
            )
            if method is None:
                return list(self._dead)
            self._dead.append((body, dict(properties.headers or {})))

    def clock(self) -> float:
        return time.monotonic()

    def stats(self) -> ConsumerStats:
        return self.consumer.stats

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(
    params=[
        pytest.param("memory", marks=pytest.mark.unit),
        pytest.param("rabbitmq", marks=pytest.mark.integration),
    ]
)
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    made: Harness = (
        MemoryHarness()
        if request.param == "memory"
        else RabbitHarness(request.getfixturevalue("broker"))
    )
    try:
        yield made
    finally:
        made.close()


# -- helpers -----------------------------------------------------------------------------------
def envelope(entity_id: str = "t-1", version: int = 1, **data: Any) -> Envelope:
    return Envelope.new(
        event_type="thing.updated",
        entity_id=entity_id,
        entity_version=version,
        data={"entity_id": entity_id, "version": version, **data},
        producer="test",
    )


def publish(harness: Harness, env: Envelope) -> None:
    harness.publish(env.to_json(), str(env.event_id), env.event_type)


class Recorder:
    """A handler that records every attempt and every success; `fail` decides what raises."""

    def __init__(self, harness: Harness, fail: Callable[[Envelope, int], None] | None = None):
        self.harness = harness
        self.fail = fail
        self.lock = threading.Lock()
        self.attempts: Counter[uuid.UUID] = Counter()
        self.attempt_times: dict[uuid.UUID, list[float]] = {}
        self.applied: list[Envelope] = []

    def __call__(self, env: Envelope) -> None:
        with self.lock:
            self.attempts[env.event_id] += 1
            self.attempt_times.setdefault(env.event_id, []).append(self.harness.clock())
            attempt = self.attempts[env.event_id]
        if self.fail is not None:
            self.fail(env, attempt)
        with self.lock:
            self.applied.append(env)

    def applied_ids(self) -> list[uuid.UUID]:
        with self.lock:
            return [e.event_id for e in self.applied]

    def was_applied(self, env: Envelope) -> bool:
        return env.event_id in self.applied_ids()


def assert_dead_headers(headers: dict[str, Any], exception_type: str, attempts: int) -> None:
    assert headers["x-exception-type"] == exception_type
    assert headers["x-attempts"] == attempts
    assert datetime.fromisoformat(headers["x-first-failure-at"]).tzinfo is not None
    assert headers["x-dead-reason"]


# -- the contract ------------------------------------------------------------------------------
def test_fifty_versions_of_one_entity_are_handled_once_each_in_version_order(harness):
    recorder = Recorder(harness)
    harness.start(recorder)
    sent = [envelope("e1", v) for v in range(1, 51)]

    for env in sent:
        publish(harness, env)
    harness.settle(lambda: len(recorder.applied_ids()) >= 50, "50 envelopes handled")

    assert [e.entity_version for e in recorder.applied] == list(range(1, 51))
    assert recorder.applied_ids() == [e.event_id for e in sent]
    assert set(recorder.attempts.values()) == {1}
    assert harness.dead_letters() == []


def test_a_message_that_fails_twice_with_a_retryable_error_is_applied_once_after_the_delays(
    harness,
):
    def fail(env: Envelope, attempt: int) -> None:
        if attempt <= 2:
            raise RetryableError(f"store away (attempt {attempt})")

    recorder = Recorder(harness, fail)
    harness.start(recorder)
    env = envelope("flaky", 1)

    publish(harness, env)
    harness.settle(lambda: recorder.was_applied(env), "the flaky message applied")

    assert recorder.applied_ids() == [env.event_id]
    assert recorder.attempts[env.event_id] == 3
    times = recorder.attempt_times[env.event_id]
    assert times[1] - times[0] >= RETRY_DELAYS[0]
    assert times[2] - times[1] >= RETRY_DELAYS[1]
    assert times[2] - times[0] >= sum(RETRY_DELAYS)
    assert harness.dead_letters() == []


def test_a_permanent_error_dead_letters_the_message_at_once_and_the_next_is_still_handled(
    harness,
):
    def fail(env: Envelope, attempt: int) -> None:
        if env.entity_id == "poison":
            raise PermanentError("thing poison references a missing owner")

    recorder = Recorder(harness, fail)
    harness.start(recorder)
    poison, after = envelope("poison", 1), envelope("fine", 1)

    publish(harness, poison)
    publish(harness, after)
    harness.settle(
        lambda: recorder.was_applied(after) and len(harness.dead_letters()) == 1,
        "the next message handled and one dead letter",
    )

    [(body, headers)] = harness.dead_letters()
    assert body == poison.to_json()
    assert_dead_headers(headers, "PermanentError", attempts=1)
    assert "thing poison references a missing owner" in headers["x-dead-reason"]
    assert headers["x-original-queue"] == harness.topology.queue
    assert recorder.attempts[poison.event_id] == 1
    assert recorder.applied_ids() == [after.event_id]


def test_an_undecodable_body_is_dead_lettered_as_a_decode_error_and_the_next_is_handled(
    harness,
):
    recorder = Recorder(harness)
    harness.start(recorder)
    after = envelope("fine", 1)

    harness.publish(b"not json", "bad-1", "thing.updated")
    publish(harness, after)
    harness.settle(
        lambda: recorder.was_applied(after) and len(harness.dead_letters()) == 1,
        "the next message handled and one dead letter",
    )

    [(body, headers)] = harness.dead_letters()
    assert body == b"not json"
    assert_dead_headers(headers, "DecodeError", attempts=1)
    assert headers["x-original-queue"] == harness.topology.queue
    assert recorder.applied_ids() == [after.event_id]
    assert sum(recorder.attempts.values()) == 1


@pytest.mark.parametrize(
    "error",
    [RetryableError("store away"), KeyError("missing key"), RuntimeError("bug")],
    ids=lambda exc: type(exc).__name__,
)
def test_a_message_that_always_fails_is_dead_lettered_after_all_retries(harness, error):
    def fail(env: Envelope, attempt: int) -> None:
        if env.entity_id == "doomed":
            raise error

    recorder = Recorder(harness, fail)
    harness.start(recorder)
    doomed = envelope("doomed", 1)

    publish(harness, doomed)
    harness.settle(lambda: len(harness.dead_letters()) == 1, "one dead letter")
    after = envelope("fine", 1)
    publish(harness, after)
    harness.settle(lambda: recorder.was_applied(after), "the next message handled")

    [(body, headers)] = harness.dead_letters()
    assert body == doomed.to_json()
    assert recorder.attempts[doomed.event_id] == ATTEMPTS
    assert_dead_headers(headers, type(error).__name__, attempts=ATTEMPTS)
    assert "retries exhausted" in headers["x-dead-reason"]
    assert headers["x-original-queue"] == harness.topology.queue
    assert recorder.applied_ids() == [after.event_id]


def test_an_unexpected_exception_is_retried_like_a_retryable_error(harness):
    def fail(env: Envelope, attempt: int) -> None:
        if attempt == 1:
            raise KeyError("a bug that passes on retry")

    recorder = Recorder(harness, fail)
    harness.start(recorder)
    env = envelope("surprise", 1)

    publish(harness, env)
    harness.settle(lambda: recorder.was_applied(env), "the message applied on retry")

    assert recorder.applied_ids() == [env.event_id]
    assert recorder.attempts[env.event_id] == 2
    times = recorder.attempt_times[env.event_id]
    assert times[1] - times[0] >= RETRY_DELAYS[0]
    assert harness.dead_letters() == []


def test_failures_of_one_message_do_not_hold_back_the_others(harness):
    # The flaky message fails until every other is applied, within its ladder (a loaded machine
    # can take longer than the first delay to publish the ten others one confirm at a time). A
    # runtime that held the others back behind it would dead-letter it and never apply it.
    def fail(env: Envelope, attempt: int) -> None:
        if env.entity_id != "flaky":
            return
        if attempt == 1 or (attempt < ATTEMPTS and len(recorder.applied_ids()) < len(others)):
            raise RetryableError("store away")

    recorder = Recorder(harness, fail)
    harness.start(recorder)
    flaky = envelope("flaky", 1)
    others = [envelope(f"other-{n}", 1) for n in range(10)]

    publish(harness, flaky)
    for env in others:
        publish(harness, env)
    harness.settle(lambda: len(recorder.applied_ids()) == 11, "all eleven messages applied")

    assert recorder.applied_ids()[:10] == [e.event_id for e in others]
    assert recorder.applied_ids()[10] == flaky.event_id


def test_an_event_type_not_declared_is_acknowledged_counted_and_never_handled(harness):
    handled: list[str] = []
    handlers = Handlers()
    handlers.add(["thing.updated"], lambda event, _data: handled.append(event.entity_id))
    harness.start(handlers)
    other = Envelope.new(
        event_type="other.created", entity_id="o", entity_version=1, data={}, producer="test"
    )
    harness.publish(other.to_json(), str(other.event_id), other.event_type)
    wanted = envelope("wanted")
    harness.publish(wanted.to_json(), str(wanted.event_id), wanted.event_type)
    harness.settle(lambda: handled == ["wanted"] and harness.stats().ignored == 1, "settled")
    assert harness.dead_letters() == []
    assert harness.stats().consumed == 1


def test_data_that_does_not_fit_the_declared_model_is_dead_lettered_at_once(harness):
    from pydantic import BaseModel, ConfigDict

    class Thing(BaseModel):
        model_config = ConfigDict(strict=True)
        size: int

    handled: list[int] = []
    handlers = Handlers()
    handlers.add(["thing.updated"], lambda _event, thing: handled.append(thing.size), data=Thing)
    harness.start(handlers)
    for message in (envelope("bad", size="big"), envelope("good", size=3)):
        harness.publish(message.to_json(), str(message.event_id), message.event_type)
    harness.settle(lambda: handled == [3] and harness.dead_letters(), "one dead, one applied")
    [(_, headers)] = harness.dead_letters()
    assert headers["x-attempts"] == 1 and headers["x-exception-type"] == "PermanentError"
    assert "thing.updated data: size" in headers["x-dead-reason"]
