"""Integration: the seed's writes through the API reach the exchange via the relay process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from delivered import unpublished
from messaging import decode
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

    relay = subprocess.Popen(
        [sys.executable, "-m", "person.relay"],
        env={
            **os.environ,
            "PERSON_DATABASE_URL": person_db,
            "AMQP_URL": broker.amqp_url,
            "EVENTS_EXCHANGE": broker.exchange,
        },
    )
    try:
        wait_until(four_received, timeout=30, what="four events on the watch queue")
        wait_until(lambda: unpublished(person_db) == 0, timeout=30, what="rows marked published")
    finally:
        relay.send_signal(signal.SIGTERM)
        try:
            code = relay.wait(30)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait(10)
            raise
    assert code == 0

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
