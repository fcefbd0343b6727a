"""Integration: the score consumer over the real RabbitMQ into the real Redis."""

from __future__ import annotations

import random
import time

import pika
import pytest
import redis
from messaging import Consumer, ConsumerSettings
from messaging.testing import running, wait_until
from score.consumer import HANDLERS

pytestmark = pytest.mark.integration


def publish_all(broker, topology, events) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        channel = conn.channel()
        topology.declare(conn)
        channel.confirm_delivery()
        for envelope in events:
            channel.basic_publish(
                broker.exchange,
                "",
                envelope.to_json(),
                pika.BasicProperties(
                    message_id=str(envelope.event_id), type=envelope.event_type, delivery_mode=2
                ),
                mandatory=True,
            )
    finally:
        conn.close()


def replicate(broker, store, events, service: str) -> dict[str, int | None]:
    topology = broker.topology(service)
    publish_all(broker, topology, events)
    # The process's own handlers and apply step, on a queue of this history's own.
    consumer = Consumer(ConsumerSettings(broker.amqp_url, topology), HANDLERS, store.apply)
    with running(consumer):
        wait_until(
            lambda: consumer.stats.consumed >= len(events),
            timeout=60,
            what=f"{len(events)} events applied",
        )
    return {cpf: (s.score if (s := store.read(cpf)) else None) for cpf in cpfs(events)}


def cpfs(events) -> list[str]:
    return sorted({e.entity_id for e in events if e.entity == "person"})


def test_thousand_events_twice_and_shuffled_give_the_scores_of_once_in_order(
    broker, redis_client, history
):
    from score.store import ScoreStore

    events = history.generate(1000)
    once = ScoreStore(redis_client, prefix=f"{broker.exchange}-once:")
    twice = ScoreStore(redis_client, prefix=f"{broker.exchange}-twice:")
    try:
        shuffled = events * 2
        random.Random(11).shuffle(shuffled)
        in_order = replicate(broker, once, events, "once")
        assert in_order == {cpf: history.expected()[cpf] for cpf in in_order}
        assert replicate(broker, twice, shuffled, "twice") == in_order
    finally:
        once.wipe()
        twice.wipe()


def test_redis_away_longer_than_the_retry_ladder_dead_letters_nothing(broker, servers, history):
    from urllib.parse import urlsplit

    from score.store import ScoreStore
    from tcp_proxy import TcpProxy

    target = urlsplit(servers.redis)
    proxy = TcpProxy(target.hostname, target.port or 6379)
    client = redis.Redis.from_url(proxy.url(servers.redis), socket_timeout=2)
    store = ScoreStore(client, prefix=f"{broker.exchange}-outage:")
    topology = broker.topology("outage", retry_delays=(0.2, 0.4))
    events = history.generate(400)
    consumer = Consumer(
        ConsumerSettings(broker.amqp_url, topology), HANDLERS, store.apply, probe=store.ping
    )
    try:
        with running(consumer):
            wait_until(consumer.attached.is_set, what="attached")
            publish_all(broker, topology, events[:200])
            wait_until(lambda: consumer.stats.consumed >= 200, what="the first half applied")
            proxy.cut()
            publish_all(broker, topology, events[200:])
            wait_until(consumer.paused.is_set, what="the consumer paused")
            ladder = time.monotonic() + 3 * sum(topology.retry_delays)
            wait_until(lambda: time.monotonic() > ladder, what="longer than the retry ladder")
            proxy.restore()
            wait_until(lambda: consumer.stats.consumed >= 400, timeout=60, what="the rest")
        assert broker.depth(topology.dead_queue) == 0
        assert consumer.stats.dead_lettered == 0
        got = {cpf: (s.score if (s := store.read(cpf)) else None) for cpf in cpfs(events)}
        assert got == {cpf: history.expected()[cpf] for cpf in got}
    finally:
        proxy.close()
        ScoreStore.from_url(servers.redis, store.prefix).wipe()


def test_redis_refusing_writes_longer_than_the_retry_ladder_dead_letters_nothing(
    broker, private_redis, history
):
    """Redis answers but refuses writes (maxmemory reached under noeviction): an outage, not the
    events' fault. The consumer is built as its process builds it."""
    from score.config import ScoreConfig
    from score.consumer import build

    config = ScoreConfig(
        score_redis_url=private_redis,
        amqp_url=broker.amqp_url,
        events_exchange=broker.exchange,
        retry_delays=(0.2, 0.4),
    )
    consumer, store = build(config)
    broker.topologies.append(consumer.topology)
    admin = redis.Redis.from_url(private_redis)
    events = history.generate(300)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        publish_all(broker, consumer.topology, events[:100])
        wait_until(lambda: consumer.stats.consumed >= 100, what="the first hundred applied")
        admin.config_set("maxmemory", 1)  # every write now answers OOM
        publish_all(broker, consumer.topology, events[100:])
        wait_until(consumer.paused.is_set, what="the consumer paused")
        assert "maxmemory" in consumer.health()
        over = time.monotonic() + 5 * sum(consumer.topology.retry_delays)
        wait_until(lambda: time.monotonic() > over, what="longer than the retry ladder")
        assert broker.depth(consumer.topology.dead_queue) == 0
        admin.config_set("maxmemory", 0)
        wait_until(lambda: consumer.stats.consumed >= 300, timeout=60, what="the rest applied")
        wait_until(lambda: consumer.health() is None, what="healthy again")
    assert broker.depth(consumer.topology.dead_queue) == 0
    got = {cpf: (s.score if (s := store.read(cpf)) else None) for cpf in cpfs(events)}
    assert got == {cpf: history.expected()[cpf] for cpf in got}


def test_a_redis_whose_name_does_not_resolve_is_an_outage_not_the_events_fault(broker, history):
    from score.config import ScoreConfig
    from score.consumer import build

    config = ScoreConfig(
        score_redis_url="redis://redis-gone.invalid:6379/0",  # .invalid never resolves
        amqp_url=broker.amqp_url,
        events_exchange=broker.exchange,
        retry_delays=(0.2, 0.4),
    )
    consumer, _ = build(config)
    broker.topologies.append(consumer.topology)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        publish_all(broker, consumer.topology, history.generate(20))
        wait_until(consumer.paused.is_set, what="paused")
        over = time.monotonic() + 3 * sum(config.retry_delays)
        wait_until(lambda: time.monotonic() > over, what="longer than the retry ladder")
        assert consumer.health().startswith("paused: the store is away")
    assert broker.depth(consumer.topology.dead_queue) == 0 and consumer.stats.retried == 0
