"""Integration: the seed's writes through the API reach the exchange via the relay process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pika
import pytest
from delivered import unpublished
from messaging import decode
from messaging.replay import COMPLETED_TYPE, request_replay, requests_queue
from messaging.testing import wait_until
from person.app import create_app

pytestmark = pytest.mark.integration

SEED = [
    (
        "/person",
        {
            "cpf": 11111,
            "name": "abc",
            "address": "abc",
            "date_of_birth": "2019-06-15T19:23:55-03:00",
        },
    ),
    ("/person/11111/income", {"type": "renting", "value": 1000}),
    ("/person/11111/asset", {"type": "apartment", "value": 100000}),
    ("/person/11111/debt", {"value": 1000}),
]


@pytest.fixture
def channel(broker) -> Iterator[Any]:
    conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        yield conn.channel()
    finally:
        if conn.is_open:
            conn.close()


@contextmanager
def relay_process(person_db: str, broker, **env: str) -> Iterator[subprocess.Popen]:
    """`python -m person.relay` on this test's database and exchange; stopped cleanly after."""
    relay = subprocess.Popen(
        [sys.executable, "-m", "person.relay"],
        env={
            **os.environ,
            "PERSON_DATABASE_URL": person_db,
            "AMQP_URL": broker.amqp_url,
            "EVENTS_EXCHANGE": broker.exchange,
            **env,
        },
    )
    try:
        yield relay
    finally:
        relay.send_signal(signal.SIGTERM)
        try:
            code = relay.wait(30)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait(10)
            raise
    assert code == 0


def test_the_seeds_four_writes_reach_a_bound_queue_in_order_through_the_relay_process(
    config, pg_store, person_db, broker, channel
):
    client = create_app(config, store=pg_store).test_client()
    answers = [
        client.post(path, json=body, headers={"X-Request-Id": f"seed-{n}"})
        for n, (path, body) in enumerate(SEED)
    ]
    assert [a.status_code for a in answers] == [201, 201, 201, 201], [a.json for a in answers]
    item_ids = [a.json["id"] for a in answers[1:]]

    watch = broker.topology("watch")
    watch.declare(channel.connection)  # bound before the relay runs: it publishes mandatory
    received: list[tuple[Any, bytes]] = []

    def four_received() -> bool:
        method, properties, body = channel.basic_get(watch.queue, auto_ack=True)
        if method is not None:
            received.append((properties, body))
        return len(received) >= 4

    with relay_process(person_db, broker):
        wait_until(four_received, timeout=30, what="four events on the watch queue")
        wait_until(lambda: unpublished(person_db) == 0, timeout=30, what="rows marked published")

    method, _, _ = channel.basic_get(watch.queue, auto_ack=True)
    assert method is None, "the relay published more than the four events"

    envelopes = [decode(body) for _, body in received]
    assert [e.event_type for e in envelopes] == [
        "person.created",
        "income.created",
        "asset.created",
        "debt.created",
    ]
    assert [e.entity_id for e in envelopes] == ["11111", *item_ids]
    assert all(e.entity_version == 1 and e.producer == "person" for e in envelopes)
    assert [e.correlation_id for e in envelopes] == [f"seed-{n}" for n in range(4)]
    person, income, asset, debt = (e.data for e in envelopes)
    assert (person["cpf"], person["date_of_birth"], person["status"]) == (
        "11111",
        "2019-06-15",
        "pending",
    )
    assert (income["type"], income["value"]) == ("renting", "1000.00")
    assert (asset["type"], asset["value"]) == ("apartment", "100000.00")
    assert (debt["type"], debt["value"], debt["cpf"]) == (None, "1000.00", "11111")

    for (properties, _), envelope in zip(received, envelopes, strict=True):
        assert properties.message_id == str(envelope.event_id)
        assert properties.type == envelope.event_type
        assert properties.content_type == "application/json"
        assert properties.delivery_mode == 2
        assert properties.correlation_id == envelope.correlation_id


def test_the_relay_process_replays_only_to_the_services_it_is_configured_for(
    config, pg_store, person_db, broker, channel
):
    client = create_app(config, store=pg_store).test_client()
    assert client.post("/person", json=SEED[0][1]).status_code == 201
    served, spy = broker.topology("served"), broker.topology("spy")
    for topology in (served, spy):
        topology.declare(channel.connection)
    for queue in (spy.queue, served.queue):  # the spy's first: it is refused, not queued
        request_replay(broker.amqp_url, broker.exchange, queue, f"asked-by-{queue}")

    completed: list[str] = []

    def completion_received() -> bool:
        method, properties, body = channel.basic_get(served.queue, auto_ack=True)
        if method is not None and properties.type == COMPLETED_TYPE:
            completed.append(json.loads(body)["request_id"])
        return bool(completed)

    with relay_process(person_db, broker, REPLAY_TARGETS="served, elsewhere"):
        wait_until(completion_received, timeout=30, what="the served queue's replay")
        wait_until(
            lambda: broker.depth(requests_queue(broker.exchange)) == 0,
            what="every request taken",
        )
    assert completed == [f"asked-by-{served.queue}"]
    method, properties, _ = channel.basic_get(spy.queue, auto_ack=True)  # the live event only
    assert method is not None and "x-replay-request" not in (properties.headers or {})
    assert channel.basic_get(spy.queue, auto_ack=True)[0] is None
