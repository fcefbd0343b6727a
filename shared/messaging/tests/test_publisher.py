"""ConfirmedPublisher against the real RabbitMQ: all confirmed, in order, or an error."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pika
import pytest
from messaging.publisher import ConfirmedPublisher, Outgoing, PublishError

pytestmark = pytest.mark.integration


@pytest.fixture
def channel(servers) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    conn = pika.BlockingConnection(pika.URLParameters(servers.amqp))
    try:
        yield conn.channel()
    finally:
        conn.close()


@pytest.fixture
def queue(channel) -> Iterator[str]:
    name = f"test-publisher-{uuid.uuid4().hex[:8]}"
    channel.queue_declare(name, durable=True)
    yield name
    channel.queue_delete(name)


def messages(queue: str, n: int) -> Iterator[Outgoing]:
    for i in range(n):
        yield Outgoing(queue, str(i).encode(), pika.BasicProperties(message_id=str(i)))


def drain(channel, queue: str) -> list[bytes]:
    bodies = []
    while True:
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body)


def test_every_message_is_confirmed_and_arrives_in_order(servers, channel, queue):
    publisher = ConfirmedPublisher(servers.amqp, "", "test-publisher", window=64)
    done = publisher.publish_all(messages(queue, 5000))
    assert done.confirmed == 5000
    assert drain(channel, queue) == [str(i).encode() for i in range(5000)]


def test_nothing_to_publish_returns_at_once(servers):
    assert ConfirmedPublisher(servers.amqp, "", "test-publisher").publish_all([]).confirmed == 0


def test_an_unroutable_message_is_an_error(servers):
    publisher = ConfirmedPublisher(servers.amqp, "", "test-publisher")
    with pytest.raises(PublishError, match="unroutable"):
        publisher.publish_all(messages(f"no-such-queue-{uuid.uuid4().hex}", 3))


def test_messages_the_broker_refuses_are_an_error(servers, channel):
    full = f"test-publisher-full-{uuid.uuid4().hex[:8]}"
    channel.queue_declare(
        full, durable=True, arguments={"x-max-length": 10, "x-overflow": "reject-publish"}
    )
    try:
        publisher = ConfirmedPublisher(servers.amqp, "", "test-publisher", window=5)
        with pytest.raises(PublishError, match="refused") as raised:
            publisher.publish_all(messages(full, 50))
        assert raised.value.confirmed >= 10
        assert len(drain(channel, full)) == 10
    finally:
        channel.queue_delete(full)


def test_a_refused_last_message_is_an_error_not_a_hang(servers, channel):
    full = f"test-publisher-full-{uuid.uuid4().hex[:8]}"
    channel.queue_declare(full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    try:
        publisher = ConfirmedPublisher(servers.amqp, "", "test-publisher")
        with pytest.raises(PublishError, match="refused"):
            publisher.publish_all(messages(full, 1), timeout=10)
    finally:
        channel.queue_delete(full)


def test_a_failing_message_source_is_an_error(servers, queue):
    def source() -> Iterator[Outgoing]:
        yield from messages(queue, 10)
        raise RuntimeError("the database went away")

    publisher = ConfirmedPublisher(servers.amqp, "", "test-publisher")
    with pytest.raises(PublishError, match="the database went away"):
        publisher.publish_all(source())


def test_confirms_that_stop_coming_are_an_error(servers, queue):
    # stall_timeout=0: the first check (after a second) finds messages waiting for a confirm.
    publisher = ConfirmedPublisher(servers.amqp, "", "test-publisher", window=100_000)
    with pytest.raises(PublishError, match="no confirm from the broker"):
        publisher.publish_all(messages(queue, 1_000_000), stall_timeout=0)


def test_a_channel_the_broker_closes_is_an_error(servers):
    # Publishing to an exchange that does not exist makes the broker close the channel (404).
    publisher = ConfirmedPublisher(servers.amqp, f"no-such-exchange-{uuid.uuid4().hex}", "test")
    with pytest.raises(PublishError, match="channel closed"):
        publisher.publish_all(messages("q", 3))


def test_an_unreachable_broker_is_an_error():
    publisher = ConfirmedPublisher("amqp://guest:guest@127.0.0.1:1/%2F", "", "test-publisher")
    with pytest.raises(PublishError, match="could not connect"):
        publisher.publish_all(messages("q", 1))
