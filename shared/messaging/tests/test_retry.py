"""Unit: where a failed message goes next (retry step or dead queue) and the queue names."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pika
import pytest
from messaging import DEFAULT_RETRY_DELAYS, DecodeError, PermanentError, RetryableError, Topology
from messaging.retry import MAX_REASON, decide, failed_attempts

pytestmark = pytest.mark.unit

TOPOLOGY = Topology(service="score", exchange="entity-changes", retry_delays=(1.0, 5.0, 30.0))
FIRST_FAILURE = "2024-05-01T12:00:00+00:00"


def props(headers: dict[str, Any] | None = None) -> pika.BasicProperties:
    return pika.BasicProperties(message_id="m-1", type="thing.updated", headers=headers)


def death(queue: str | bytes, count: int, reason: str = "expired") -> dict[str, Any]:
    """One x-death entry as RabbitMQ writes it (pika may hand over strings as bytes)."""
    return {
        "count": count,
        "reason": reason,
        "queue": queue,
        "time": datetime(2024, 5, 1, 12, 0, 1),
        "exchange": "",
        "routing-keys": [queue],
    }


def test_a_first_failure_goes_to_the_first_retry_queue_with_one_attempt():
    before = datetime.now(UTC)

    decision = decide(TOPOLOGY, props(), RetryableError("store away"))

    assert decision.queue == "score.entity-changes.retry.1s"
    assert not decision.dead
    assert decision.headers["x-attempts"] == 1
    first = datetime.fromisoformat(decision.headers["x-first-failure-at"])
    assert first.tzinfo is not None
    assert before <= first <= datetime.now(UTC)
    assert decision.headers["x-exception-type"] == "RetryableError"
    assert decision.headers["x-last-error"] == "RetryableError: store away"
    assert "x-dead-reason" not in decision.headers


def test_a_message_without_any_properties_headers_counts_as_never_failed():
    assert failed_attempts(TOPOLOGY, None) == 0
    assert failed_attempts(TOPOLOGY, {}) == 0
    assert decide(TOPOLOGY, object(), KeyError("x")).queue == TOPOLOGY.retry_queue(0)


@pytest.mark.parametrize(
    ("x_death", "expected"),
    [
        pytest.param([death("score.entity-changes.retry.1s", 1)], 1, id="one-retry"),
        pytest.param(
            [death("score.entity-changes.retry.5s", 1), death("score.entity-changes.retry.1s", 1)],
            2,
            id="two-retry-queues",
        ),
        pytest.param([death(b"score.entity-changes.retry.1s", 2)], 2, id="queue-as-bytes"),
        pytest.param(
            [death(b"score.entity-changes.retry.5s", 1), death("score.entity-changes.retry.1s", 2)],
            3,
            id="mixed-bytes-and-text-with-counts",
        ),
        pytest.param(
            [death("score.entity-changes", 4, reason="rejected")], 0, id="work-queue-not-counted"
        ),
        pytest.param(
            [death("other.entity-changes.retry.1s", 3)], 0, id="other-services-retry-not-counted"
        ),
    ],
)
def test_attempts_are_counted_from_the_retry_queues_in_the_x_death_header(x_death, expected):
    assert failed_attempts(TOPOLOGY, {"x-death": x_death}) == expected


def test_attempts_fall_back_to_our_own_header_when_x_death_is_missing_or_smaller():
    assert failed_attempts(TOPOLOGY, {"x-attempts": 2}) == 2
    headers = {"x-attempts": 2, "x-death": [death("score.entity-changes.retry.1s", 1)]}
    assert failed_attempts(TOPOLOGY, headers) == 2
    headers = {"x-attempts": 1, "x-death": [death("score.entity-changes.retry.1s", 3)]}
    assert failed_attempts(TOPOLOGY, headers) == 3


@pytest.mark.parametrize(
    ("previous_failures", "queue"),
    [
        (0, "score.entity-changes.retry.1s"),
        (1, "score.entity-changes.retry.5s"),
        (2, "score.entity-changes.retry.30s"),
    ],
)
def test_each_failure_moves_the_message_to_the_next_retry_step(previous_failures, queue):
    deaths = [death(TOPOLOGY.retry_queue(step), 1) for step in range(previous_failures)]

    decision = decide(TOPOLOGY, props({"x-death": deaths}), RetryableError("again"))

    assert decision.queue == queue
    assert not decision.dead
    assert decision.headers["x-attempts"] == previous_failures + 1


def test_after_as_many_failures_as_retry_steps_the_message_goes_to_the_dead_queue():
    deaths = [death(q.encode(), 1) for q in reversed(TOPOLOGY.retry_queues)]
    headers = {"x-death": deaths, "x-attempts": 3, "x-first-failure-at": FIRST_FAILURE}

    decision = decide(TOPOLOGY, props(headers), RetryableError("store still away"))

    assert decision.dead
    assert decision.queue == "score.entity-changes.dead"
    assert "retries exhausted" in decision.headers["x-dead-reason"]
    assert "store still away" in decision.headers["x-dead-reason"]
    assert decision.headers["x-exception-type"] == "RetryableError"
    assert decision.headers["x-attempts"] == 4
    assert decision.headers["x-first-failure-at"] == FIRST_FAILURE
    assert decision.headers["x-original-queue"] == "score.entity-changes"
    assert datetime.fromisoformat(decision.headers["x-dead-at"]).tzinfo is not None


def test_the_first_failure_time_is_preserved_even_when_the_header_arrives_as_bytes():
    headers = {"x-first-failure-at": FIRST_FAILURE.encode()}

    decision = decide(TOPOLOGY, props(headers), RetryableError("again"))

    assert decision.headers["x-first-failure-at"] == FIRST_FAILURE


@pytest.mark.parametrize(
    "exc",
    [PermanentError("bad reference"), DecodeError("not an envelope")],
    ids=lambda exc: type(exc).__name__,
)
def test_a_permanent_failure_goes_straight_to_the_dead_queue(exc):
    decision = decide(TOPOLOGY, props(), exc, permanent=True)

    assert decision.dead
    assert decision.queue == TOPOLOGY.dead_queue
    assert decision.headers["x-attempts"] == 1
    assert decision.headers["x-exception-type"] == type(exc).__name__
    assert str(exc) in decision.headers["x-dead-reason"]
    assert "retries exhausted" not in decision.headers["x-dead-reason"]
    assert decision.headers["x-original-queue"] == TOPOLOGY.queue
    assert "x-first-failure-at" in decision.headers


def test_with_no_retry_steps_the_first_failure_is_already_dead():
    topology = Topology("score", "entity-changes", retry_delays=())

    decision = decide(topology, props(), RetryableError("x"))

    assert decision.dead
    assert "retries exhausted" in decision.headers["x-dead-reason"]


def test_a_huge_exception_message_is_cut_to_a_bounded_reason():
    decision = decide(TOPOLOGY, props(), PermanentError("x" * 100_000), permanent=True)

    assert len(decision.headers["x-dead-reason"]) <= MAX_REASON
    assert len(decision.headers["x-last-error"]) <= MAX_REASON


def test_queues_are_named_after_service_and_exchange():
    topology = Topology(service="score", exchange="entity-changes")

    assert topology.queue == "score.entity-changes"
    assert topology.dead_queue == "score.entity-changes.dead"
    assert topology.retry_delays == DEFAULT_RETRY_DELAYS
    assert topology.retry_queues == tuple(
        f"score.entity-changes.retry.{label}" for label in ("1s", "5s", "30s", "120s", "600s")
    )


@pytest.mark.parametrize(
    ("delay", "label"),
    [
        (1.0, "1s"),
        (1, "1s"),
        (0.2, "200ms"),
        (0.4, "400ms"),
        (1.5, "1500ms"),
        (30.0, "30s"),
        (600.0, "600s"),
        (0.05, "50ms"),
    ],
)
def test_retry_queues_are_labelled_with_their_delay(delay, label):
    topology = Topology(service="notifier", exchange="ex", retry_delays=(delay,))

    assert topology.retry_queue(0) == f"notifier.ex.retry.{label}"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"x-death": 5}, id="x-death-an-integer"),
        pytest.param({"x-death": "expired"}, id="x-death-text"),
        pytest.param({"x-death": ["junk"]}, id="an-entry-not-a-table"),
        pytest.param({"x-death": [death("score.entity-changes.retry.1s", "3")]}, id="count-text"),
        pytest.param({"x-death": [death("score.entity-changes.retry.1s", True)]}, id="count-bool"),
        pytest.param({"x-death": [death("score.entity-changes.retry.1s", -1)]}, id="count-neg"),
        pytest.param({"x-attempts": "5"}, id="x-attempts-text"),
        pytest.param({"x-attempts": 10**12}, id="x-attempts-huge"),
        pytest.param({"x-attempts": 2.5}, id="x-attempts-float"),
    ],
)
def test_a_message_whose_failure_headers_cannot_be_read_is_dead_lettered_with_the_reason(headers):
    decision = decide(TOPOLOGY, props(headers), RetryableError("store away"))

    assert decision.dead
    assert decision.queue == TOPOLOGY.dead_queue
    reason = decision.headers["x-dead-reason"]
    assert reason.startswith("cannot judge the message")
    assert "RetryableError: store away" in reason
    assert decision.headers["x-original-queue"] == TOPOLOGY.queue


def test_deciding_never_raises_whatever_the_properties_are():
    class Hostile:
        @property
        def headers(self):
            raise RuntimeError("no headers for you")

    decision = decide(TOPOLOGY, Hostile(), ValueError("bad"))

    assert decision.dead
    assert "no headers for you" in decision.headers["x-dead-reason"]
