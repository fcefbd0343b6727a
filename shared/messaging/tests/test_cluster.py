"""The library on a three-node RabbitMQ cluster of the test run's own, while its nodes die.

AMQP_URL lists the three nodes, c1 first: every client connects to c1, which also leads the
queues (a quorum queue's leader starts on the node of the connection that declares it). Killing
c1 therefore takes away the clients' node and the queues' leader at once.
"""

from __future__ import annotations

import itertools
import threading

import psycopg
import pytest
from delivered import Seen, unpublished
from messaging import Consumer, ConsumerSettings, Outbox, Relay, RelaySettings, connection
from messaging.cli import main as cli
from messaging.connection import BrokerProbe, connect
from messaging.testing import running, wait_until
from messaging.topology import Topology

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

NODES = {"c1@localhost", "c2@localhost", "c3@localhost"}


def declared(space, service: str) -> Topology:
    topology = Topology(service, space.exchange, (0.2, 0.4), group_size=3)
    space.topologies.append(topology)
    conn = connect(space.amqp_url, "cluster-test")
    try:
        topology.declare(conn)
    finally:
        conn.close()
    return topology


def write(db: str, entities: int, rounds: int) -> None:
    """`rounds` changes of each entity, one transaction per round over all entities."""
    outbox = Outbox("test")
    with psycopg.connect(db) as conn:
        for _ in range(rounds):
            with conn.transaction(), conn.cursor() as cur:
                for e in range(entities):
                    outbox.add(cur, event_type="thing.updated", entity_id=f"e{e}", data={})


class Writer(threading.Thread):
    """Writes rounds of changes until `after` more rounds followed `killed` being set."""

    def __init__(self, db: str, entities: int, after: int) -> None:
        super().__init__(name="writer")
        self.db, self.entities, self.after = db, entities, after
        self.killed = threading.Event()
        self.rounds = 0

    def run(self) -> None:
        left = self.after
        while left:
            write(self.db, self.entities, 1)
            self.rounds += 1
            if self.killed.is_set():
                left -= 1

    def expected(self) -> set[tuple[str, int]]:
        return {(f"e{e}", v) for e in range(self.entities) for v in range(1, self.rounds + 1)}


@pytest.fixture(autouse=True)
def connections_start_at_the_first_node(monkeypatch):
    """Connections start from a rotating node; here every one starts at c1, the node these tests
    kill or stop (so a queue's leader, placed where it is declared, and the clients are on it)."""
    monkeypatch.setattr(connection, "_ROTATION", itertools.repeat(0))


def test_every_queue_of_a_topology_has_a_member_on_every_node(rabbit_cluster, cluster_broker):
    topology = declared(cluster_broker, "svc")
    queues = rabbit_cluster.queues()
    for name in (topology.queue, topology.dead_queue, *topology.retry_queues):
        assert queues[name]["type"] == "quorum", name
        assert set(queues[name]["members"]) == NODES, name
        assert set(queues[name]["online"]) == NODES, name
    assert rabbit_cluster.leader(topology.queue) == "c1"


def test_relay_and_consumer_lose_and_skip_nothing_when_their_node_and_the_leader_die(
    rabbit_cluster, cluster_broker, producer_db
):
    topology = declared(cluster_broker, "svc")
    seen = Seen()
    consumer = Consumer(ConsumerSettings(cluster_broker.amqp_url, topology, max_batch=50), seen)
    relay = Relay(
        RelaySettings(
            producer_db, cluster_broker.amqp_url, cluster_broker.exchange, poll_interval=0.5
        )
    )
    # Writes go on through the kill and for 100 rounds after it: rows are being written, in
    # flight on the relay's channel and in the consumer's hands when the node dies.
    writer = Writer(producer_db, entities=20, after=100)
    with running(consumer), running(relay):
        wait_until(consumer.attached.is_set, what="the consumer attached")
        writer.start()
        wait_until(lambda: len(seen.distinct()) >= 500, timeout=60, what="500 events through")
        assert rabbit_cluster.leader(topology.queue) == "c1"
        rabbit_cluster.kill("c1")
        writer.killed.set()
        writer.join(timeout=120)
        wait_until(
            lambda: seen.distinct() == writer.expected() and unpublished(producer_db) == 0,
            timeout=90,
            interval=0.2,
            what="every event delivered and every row marked after the kill",
        )
        assert rabbit_cluster.leader(topology.queue) in ("c2", "c3")
        assert consumer.stats.connections >= 2  # it reconnected, to another node
    assert writer.rounds > 100


def test_a_cleanly_stopped_node_sends_its_clients_to_another(
    rabbit_cluster, cluster_broker, producer_db
):
    topology = declared(cluster_broker, "svc")
    seen = Seen()
    consumer = Consumer(ConsumerSettings(cluster_broker.amqp_url, topology), seen)
    relay = Relay(
        RelaySettings(
            producer_db, cluster_broker.amqp_url, cluster_broker.exchange, poll_interval=0.5
        )
    )
    with running(consumer), running(relay):
        wait_until(consumer.attached.is_set, what="the consumer attached")
        write(producer_db, 10, 10)
        wait_until(lambda: len(seen.distinct()) == 100, timeout=30, what="the first 100 events")
        rabbit_cluster.stop_app("c1")
        write(producer_db, 10, 10)
        wait_until(lambda: len(seen.distinct()) == 200, timeout=60, what="100 more events")
        rabbit_cluster.start_app("c1")
        write(producer_db, 10, 10)
        wait_until(lambda: len(seen.distinct()) == 300, timeout=60, what="the last 100 events")
    assert unpublished(producer_db) == 0


def test_readiness_and_the_operators_command_work_while_the_first_node_is_dead(
    rabbit_cluster, cluster_broker, monkeypatch, capsys
):
    topology = declared(cluster_broker, "svc")
    rabbit_cluster.kill("c1")
    BrokerProbe(cluster_broker.amqp_url)()  # does not raise
    monkeypatch.setenv("AMQP_URL", cluster_broker.amqp_url)
    assert cli(["dlq", "list", topology.queue]) == 0
    assert f"{topology.dead_queue}: 0 dead message(s)" in capsys.readouterr().out
