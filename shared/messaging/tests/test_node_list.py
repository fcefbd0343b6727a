"""AMQP_URL naming several nodes: a client whose first node is dead works through the second.

The first node here is a closed port (a dead node refuses connections the same way) or a name
that does not resolve (a stopped container's name, in compose), and the second the local
broker, so every client of the library is shown to skip a dead node: the relay, the consumer
runtime, the confirmed publisher with the replay, replay requests, the readiness probe and the
operator's command. The cluster tests (test_cluster.py) do the same against nodes
that die while the clients are connected.
"""

from __future__ import annotations

import dataclasses
import re
import socket

import pika
import psycopg
import pytest
from messaging import Consumer, ConsumerSettings, Envelope, Outbox, Relay, RelaySettings
from messaging.cli import main as cli
from messaging.connection import BrokerProbe, connect, node_urls
from messaging.publisher import ConfirmedPublisher, Outgoing, event_properties
from messaging.replay import replay, request_replay, requests_queue
from messaging.settings import BrokerSettings
from messaging.testing import running, wait_until

pytestmark = pytest.mark.integration


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture(params=["refused", "unresolvable"])
def dead_url(request) -> str:
    if request.param == "refused":
        return f"amqp://guest:guest@127.0.0.1:{closed_port()}/%2F"
    return "amqp://guest:guest@rabbit-gone.invalid:5672/%2F"  # .invalid never resolves


@pytest.fixture
def dead_first(broker, dead_url):
    """The test's exchange, reached through an AMQP_URL whose first node is dead (its queues
    are the broker fixture's, deleted after the test)."""
    return dataclasses.replace(broker, amqp_url=f"{dead_url},{broker.amqp_url}")


class Seen:
    def __init__(self) -> None:
        self.versions: list[int] = []

    def __call__(self, envelope: Envelope) -> None:
        self.versions.append(envelope.entity_version)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", "names no broker"),
        (" , ", "names no broker"),
        ("http://guest:secret@host/", "node 1 is not an amqp:// or amqps:// URL (http://)"),
        (
            "amqp://a/%2F,guest:secret@b:5672",
            "node 2 is not an amqp:// or amqps:// URL (no scheme)",
        ),
    ],
)
def test_an_amqp_url_that_names_no_broker_node_is_refused_without_repeating_it(url, reason):
    with pytest.raises(ValueError, match=re.escape(reason)) as refused:
        node_urls(url)
    assert "secret" not in str(refused.value)
    with pytest.raises(ValueError, match=re.escape(reason)) as refused:  # a process won't start
        BrokerSettings(amqp_url=url, events_exchange="x")
    assert "secret" not in str(refused.value)


@pytest.mark.unit
def test_amqp_url_lists_keep_their_nodes_in_order():
    assert node_urls(" amqp://a/%2F , AMQPS://b/%2F,") == ["amqp://a/%2F", "AMQPS://b/%2F"]


def test_a_connection_goes_to_the_first_node_that_answers(dead_first, dead_url):
    assert node_urls(dead_first.amqp_url)[0] == dead_url
    conn = connect(dead_first.amqp_url, "node-list-test")
    try:
        assert conn.is_open
        assert conn.channel().is_open
    finally:
        conn.close()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        connect(dead_url, "node-list-test")


def test_relay_and_consumer_deliver_every_event_past_a_dead_first_node(producer_db, dead_first):
    seen = Seen()
    topology = dead_first.topology("svc")
    consumer = Consumer(ConsumerSettings(dead_first.amqp_url, topology), seen)
    relay = Relay(
        RelaySettings(producer_db, dead_first.amqp_url, dead_first.exchange, poll_interval=0.5)
    )
    with running(consumer):
        wait_until(consumer.attached.is_set, what="the consumer attached")
        with running(relay):
            outbox = Outbox("test")
            with psycopg.connect(producer_db) as conn, conn.cursor() as cur:
                for n in range(50):
                    outbox.add(cur, event_type="thing.updated", entity_id="t1", data={"n": n})
            wait_until(lambda: len(seen.versions) >= 50, what="50 events")
            assert relay.is_leader.is_set()
    assert seen.versions == list(range(1, 51))
    assert consumer.stats.connections == 1  # no reconnection: the dead node was skipped at once


def test_publisher_replay_and_replay_requests_skip_a_dead_first_node(producer_db, dead_first):
    queue = dead_first.topology("svc").queue
    conn = connect(dead_first.amqp_url, "node-list-test")
    try:
        channel = conn.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    finally:
        conn.close()
    published = ConfirmedPublisher(dead_first.amqp_url, "", "node-list-test").publish_all(
        Outgoing(queue, b"{}", event_properties(f"id-{n}", "thing.updated", None))
        for n in range(20)
    )
    assert published.confirmed == 20
    with psycopg.connect(producer_db) as db, db.cursor() as cur:
        Outbox("test").add(cur, event_type="thing.created", entity_id="t1", data={})
    assert replay(producer_db, dead_first.amqp_url, queue) == 1
    request_replay(dead_first.amqp_url, dead_first.exchange, queue, "request-1")
    assert dead_first.depth(requests_queue(dead_first.exchange)) == 1
    assert dead_first.depth(queue) == 21


def test_readiness_probe_passes_past_a_dead_first_node_and_fails_with_none_alive(
    dead_first, dead_url
):
    BrokerProbe(dead_first.amqp_url)()  # does not raise
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        BrokerProbe(f"{dead_url},{dead_url}")()


def test_the_operators_command_works_past_a_dead_first_node(
    producer_db, dead_first, monkeypatch, capsys
):
    topology = dead_first.topology("svc")
    conn = connect(dead_first.amqp_url, "node-list-test")
    try:
        topology.declare(conn)
    finally:
        conn.close()
    monkeypatch.setenv("AMQP_URL", dead_first.amqp_url)
    assert cli(["dlq", "list", topology.queue]) == 0
    assert f"{topology.dead_queue}: 0 dead message(s)" in capsys.readouterr().out
    with psycopg.connect(producer_db) as db, db.cursor() as cur:
        Outbox("test").add(cur, event_type="thing.created", entity_id="t1", data={})
    assert cli(["--database-url", producer_db, "replay", "--to", topology.queue]) == 0
    assert f"replayed 1 event(s) to {topology.queue}" in capsys.readouterr().out
