"""Generated hostile messages at each consumer, over the real RabbitMQ and the real stores.

Any body, any AMQP header table (nested, of every type pika can encode, under the very names
the failure path reads), odd properties and sizes. Between them, valid events. The consumer must
never stop: every valid event is applied, every invalid message ends in the dead queue with a
reason, and the consumer stays healthy.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pika
import pytest
import redis
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from messaging import Consumer, Envelope
from messaging.deadletters import dead_reason
from messaging.envelope import MAX_BODY_BYTES
from messaging.testing import running, wait_until
from notifier.config import NotifierConfig
from notifier.consumer import build as build_notifier
from psycopg_pool import ConnectionPool
from score.config import ScoreConfig
from score.consumer import build as build_score
from score.store import ScoreStore

pytestmark = pytest.mark.integration

FAILURE_HEADERS = ["x-death", "x-attempts", "x-first-failure-at", "x-delivery-count"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=30),
    st.binary(max_size=30),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1)),
    st.decimals(min_value=-(10**6), max_value=10**6, places=3, allow_nan=False),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(min_size=1, max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
headers = st.dictionaries(
    st.sampled_from(FAILURE_HEADERS) | st.text(min_size=1, max_size=20), values, max_size=5
)
short = st.text(max_size=40).filter(lambda t: len(t.encode()) <= 255)
properties = st.fixed_dictionaries(
    {},
    optional={
        "message_id": short,
        "type": short.filter(lambda t: not t.startswith("messaging.")),
        "content_type": short,
        "correlation_id": short,
        "app_id": short,
        "priority": st.integers(0, 255),
        "timestamp": st.integers(0, 2**40),
        "delivery_mode": st.sampled_from([1, 2]),
        "expiration": st.sampled_from(["0", "1"]),
    },
)
bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.just(b"x" * (MAX_BODY_BYTES + 1)),
    st.sampled_from([b"{}", b"[]", b"null", b'{"event_type": "person.created"}', b"1e999"]),
)


@st.composite
def hostile(draw: Callable) -> dict[str, Any]:
    """One message: a valid person event or garbage, with hostile headers and properties."""
    valid = draw(st.booleans())
    props = draw(properties)
    cpf = f"{uuid.uuid4().int % 10**11:011d}"
    return {
        "cpf": cpf if valid else None,
        "body": person_created(cpf).to_json() if valid else draw(bodies),
        "headers": draw(headers),
        "properties": props,
        "expires": "expiration" in props,  # a TTL of 0 or 1 ms: the broker dead-letters it
    }


def person_created(cpf: str) -> Envelope:
    now = datetime.now(UTC).isoformat()
    return Envelope.new(
        event_type="person.created",
        entity_id=cpf,
        entity_version=1,
        data={
            "cpf": cpf,
            "name": "H",
            "address": "a",
            "date_of_birth": "1990-01-01",
            "email": None,
            "status": "pending",
            "created_at": now,
            "updated_at": now,
        },
        producer="person",
    )


def encodable(props: pika.BasicProperties) -> bool:
    try:
        props.encode()
        return True
    except Exception:
        return False


class Target:
    """A consumer under attack, its queue and how to tell that a person event was applied."""

    def __init__(self, broker, consumer: Consumer, applied: Callable[[str], bool]) -> None:
        self.broker, self.consumer, self.applied = broker, consumer, applied
        self.conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
        self.channel = self.conn.channel()
        self.channel.confirm_delivery()
        self.dead: dict[str, str] = {}

    def attack(self, messages: list[dict[str, Any]]) -> None:
        queue = self.consumer.topology.queue
        marks = []
        for message in messages:
            mark = uuid.uuid4().hex
            props = pika.BasicProperties(
                headers={**message["headers"], "x-test-mark": mark}, **message["properties"]
            )
            assume(encodable(props))
            marks.append((mark, message))
            self.channel.basic_publish("", queue, message["body"], props)
        sentinel = f"{uuid.uuid4().int % 10**11:011d}"
        self.channel.basic_publish("", queue, person_created(sentinel).to_json())
        wait_until(lambda: self.applied(sentinel), timeout=30, what="the event after the attack")
        for mark, message in marks:
            if not message["cpf"]:  # garbage: dead, with a reason
                wait_until(lambda m=mark: self._dead(m), timeout=30, what="the dead letter")
                assert self.dead[mark], f"no reason recorded for {message}"
            elif message["expires"]:  # consumed, or expired first (dead-lettered by the broker)
                wait_until(
                    lambda m=mark, c=message["cpf"]: self.applied(c) or self._dead(m),
                    timeout=30,
                    what="the expiring event applied or dead",
                )
            else:
                assert self.applied(message["cpf"]), "a valid event was not applied"
        assert self.consumer.health() is None

    def _dead(self, mark: str) -> bool:
        """Whether the marked message reached the dead queue (dead letters read are removed
        and kept with their reasons in self.dead)."""
        while True:
            method, props, _ = self.channel.basic_get(self.consumer.topology.dead_queue)
            if method is None:
                break
            headers = props.headers or {}
            found = headers.get("x-test-mark")
            found = found.decode() if isinstance(found, bytes) else found
            self.dead[found] = dead_reason(headers)
            self.channel.basic_ack(method.delivery_tag)
        return mark in self.dead

    def close(self) -> None:
        self.conn.close()


def run_attack(target: Target) -> None:
    @settings(settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite")))
    @given(messages=st.lists(hostile(), min_size=1, max_size=4))
    def attack(messages: list[dict[str, Any]]) -> None:
        target.attack(messages)

    with running(target.consumer):
        wait_until(target.consumer.attached.is_set, what="attached")
        attack()


def test_the_score_consumer_survives_any_message(broker, servers):
    client = redis.Redis.from_url(servers.redis)
    store = ScoreStore(client, f"hostile-{uuid.uuid4().hex[:8]}:")
    config = ScoreConfig(
        amqp_url=broker.amqp_url, events_exchange=broker.exchange, retry_delays=(0.2,)
    )
    consumer, _ = build_score(config, store)  # as the process builds it
    broker.topologies.append(consumer.topology)
    target = Target(broker, consumer, lambda cpf: store.read(cpf) is not None)
    try:
        run_attack(target)
    finally:
        target.close()
        store.wipe()


def test_the_notifier_consumer_survives_any_message(broker, notifier_db, servers):
    config = NotifierConfig(
        notifier_database_url=notifier_db,
        amqp_url=broker.amqp_url,
        events_exchange=broker.exchange,
        retry_delays=(0.2,),
        activation_secret="h",
    )
    with ConnectionPool(notifier_db, min_size=1, max_size=3) as pool:
        consumer, store = build_notifier(config, pool)  # as the process builds it
        broker.topologies.append(consumer.topology)
        target = Target(broker, consumer, lambda cpf: store.user(cpf) is not None)
        try:
            run_attack(target)
        finally:
            target.close()


def test_values_pika_cannot_encode_are_skipped_not_hidden():
    """The attack skips only what no broker client could send (an example the test rejects)."""
    assert not encodable(pika.BasicProperties(headers={"x": Decimal("1e-300")}))
    assert encodable(pika.BasicProperties(headers={"x-death": 5}))
