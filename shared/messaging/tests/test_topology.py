"""Integration: every queue is a quorum queue with at-least-once dead-lettering, and old
declarations are migrated without losing a message. Against the real RabbitMQ."""

from __future__ import annotations

import time

import pika
import pytest
from messaging import Consumer, ConsumerSettings, Envelope
from messaging.testing import running, wait_until
from messaging.topology import DELIVERY_LIMIT, broker_version

pytestmark = pytest.mark.integration


def connection(broker) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(broker.amqp_url))


@pytest.fixture
def queue_arguments(servers):
    """name → (type, arguments) of the named queues, as the run's RabbitMQ node lists them."""

    def listed(names: set[str]) -> dict[str, tuple[str, dict]]:
        rows = servers.broker.queues()
        return {
            row["name"]: (row["type"], row["arguments"]) for row in rows if row["name"] in names
        }

    return listed


@pytest.mark.containers  # with containers the queues are listed by rabbitmqctl in the container
def test_every_queue_is_quorum_and_every_hop_between_them_at_least_once(broker, queue_arguments):
    topology = broker.topology("decl", retry_delays=(1.0, 30.0))
    conn = connection(broker)
    topology.declare(conn)
    version = broker_version(conn)
    conn.close()
    names = {topology.queue, topology.dead_queue, *topology.retry_queues}
    found = queue_arguments(names)
    assert {name: kind for name, (kind, _) in found.items()} == dict.fromkeys(names, "quorum")
    work = found[topology.queue][1]
    assert work["x-dead-letter-routing-key"] == topology.dead_queue
    assert work["x-delivery-limit"] == DELIVERY_LIMIT
    for name in (topology.queue, *topology.retry_queues):
        assert found[name][1]["x-dead-letter-strategy"] == "at-least-once"
        assert found[name][1]["x-overflow"] == "reject-publish"
    for step, name in enumerate(topology.retry_queues):
        assert found[name][1]["x-message-ttl"] == round(topology.retry_delays[step] * 1000)
        assert found[name][1]["x-dead-letter-routing-key"] == topology.queue
    dead = found[topology.dead_queue][1]
    assert dead.get("x-delivery-limit") == (-1 if version >= (4,) else None)


def declare_as_before(channel, topology) -> None:
    """The declarations of the version before quorum retry queues (classic, at-most-once)."""
    channel.exchange_declare(topology.exchange, "fanout", durable=True)
    channel.queue_declare(topology.queue, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(topology.queue, topology.exchange)
    channel.queue_declare(topology.dead_queue, durable=True, arguments={"x-queue-type": "quorum"})
    for step, delay in enumerate(topology.retry_delays):
        channel.queue_declare(
            topology.retry_queue(step),
            durable=True,
            arguments={
                "x-message-ttl": round(delay * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": topology.queue,
            },
        )


def test_old_declarations_are_migrated_and_keep_every_message(broker, queue_arguments):
    topology = broker.topology("old", retry_delays=(600.0,))
    before = connection(broker)
    channel = before.channel()
    declare_as_before(channel, topology)
    channel.confirm_delivery()
    queues = (topology.queue, topology.dead_queue, topology.retry_queue(0))
    for queue in queues:
        for n in range(5):
            body = f"{queue}-{n}".encode()
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    before.close()
    conn = connection(broker)
    channel = conn.channel()

    topology.declare(conn)
    topology.declare(conn)  # a second declaration finds nothing to do

    for queue in queues:
        assert channel.queue_declare(queue, passive=True).method.message_count == 5, queue
    kinds = {name: kind for name, (kind, _) in queue_arguments(set(queues)).items()}
    assert kinds == dict.fromkeys(queues, "quorum")
    assert all(f"{q}.migrating" not in queue_arguments({f"{q}.migrating"}) for q in queues)
    channel.basic_publish(topology.exchange, "", b"new", pika.BasicProperties(delivery_mode=2))
    assert wait_until(
        lambda: channel.queue_declare(topology.queue, passive=True).method.message_count == 6,
        what="the exchange bound to the migrated work queue",
    )
    conn.close()


def test_a_migration_interrupted_half_way_is_finished_by_the_next_declaration(
    broker, queue_arguments
):
    topology = broker.topology("half")
    conn = connection(broker)
    topology.declare(conn)
    channel = conn.channel()
    channel.confirm_delivery()
    holding = f"{topology.queue}.migrating"  # what a migrator killed mid-way leaves
    channel.queue_declare(holding, durable=True, arguments={"x-queue-type": "classic"})
    channel.queue_bind(holding, topology.exchange)
    for n in range(3):
        channel.basic_publish("", holding, f"m{n}".encode(), pika.BasicProperties(delivery_mode=2))

    topology.declare(conn)

    assert channel.queue_declare(topology.queue, passive=True).method.message_count == 3
    assert queue_arguments({holding}) == {}
    conn.close()


@pytest.mark.faults
@pytest.mark.serial  # it stops the run's RabbitMQ: no other test may run beside it
@pytest.mark.containers  # with containers a restart is the whole node's, not only its app's
def test_a_broker_restart_while_messages_wait_in_a_retry_queue_loses_none(
    broker, restartable_broker
):
    failed_once: set[str] = set()
    applied: set[str] = set()

    def fails_once(env: Envelope) -> None:
        if env.entity_id not in failed_once:
            failed_once.add(env.entity_id)
            raise ValueError("first attempt fails")
        applied.add(env.entity_id)

    topology = broker.topology("restart", retry_delays=(2.0,))
    consumer = Consumer(ConsumerSettings(broker.amqp_url, topology), fails_once)
    ids = [f"r{n}" for n in range(100)]
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        broker.publish(
            *[
                Envelope.new(
                    event_type="thing.created",
                    entity_id=i,
                    entity_version=1,
                    data={},
                    producer="test",
                )
                for i in ids
            ]
        )
        wait_until(lambda: len(failed_once) == len(ids), what="every first attempt failed")
        restartable_broker.stop()
        # Their delay runs out while the broker is down: they expire as it boots, before or
        # after the work queue is back.
        time.sleep(3)
        restartable_broker.start()
        wait_until(lambda: applied == set(ids), timeout=240, what="every message applied")
    assert broker.depth(topology.dead_queue) == 0
