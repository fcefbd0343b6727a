"""The library's examples (shared/messaging/examples) run as a stranger would run them: a producer
writing to its outbox, the relay publishing, the example's read model consuming into a Redis of
its own, and healing itself when that Redis loses its data."""

from __future__ import annotations

import importlib.util
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
import redis
from messaging import BrokerSettings, Outbox, Relay, RelaySettings, ReplayServer, serve_health
from messaging.testing import running, wait_until

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(producer_db: str, *changes: tuple[str, str, dict | None]) -> None:
    """The producer's side: each change and its event in one transaction (its outbox)."""
    with psycopg.connect(producer_db) as conn:
        for event_type, entity_id, data in changes:
            with conn.transaction(), conn.cursor() as cur:
                Outbox("person").add(cur, event_type=event_type, entity_id=entity_id, data=data)


@pytest.fixture
def pipeline(producer_db, broker):
    """The producer's relay and replay server, for a model named `service` on the broker."""

    def start(consumer):
        broker.topologies.append(consumer.topology)
        relay = Relay(
            RelaySettings(producer_db, broker.amqp_url, broker.exchange, poll_interval=0.2)
        )
        server = ReplayServer(
            producer_db, broker.amqp_url, broker.exchange, [consumer.topology.queue], min_interval=0
        )
        return running(relay), running(server), running(consumer)

    return start


@pytest.mark.unit
@pytest.mark.parametrize("name", ["names", "activity"])
def test_each_example_read_model_fits_in_forty_lines(name):
    assert len((EXAMPLES / f"{name}.py").read_text().splitlines()) <= 40


# --8<-- [start:names-test] (docs/library/index.md shows this test)
def test_the_names_example_keeps_each_persons_name_and_heals_a_store_that_lost_it(
    producer_db, broker, private_redis, pipeline
):
    names = example("names")
    client = redis.Redis.from_url(private_redis, decode_responses=True)
    settings = BrokerSettings(amqp_url=broker.amqp_url, events_exchange=broker.exchange)
    consumer = names.build(settings, client)
    relay, server, running_consumer = pipeline(consumer)
    with relay, server, running_consumer:
        wait_until(consumer.attached.is_set, what="attached")
        write(
            producer_db,
            ("person.created", "1", {"name": "Ana"}),
            ("person.updated", "1", {"name": "Ana Maria"}),
            ("person.created", "2", {"name": "Bia"}),
            ("person.deleted", "2", None),
            ("income.created", "i", {"cpf": "1"}),  # not this model's: counted as ignored
        )
        wait_until(lambda: client.hget("names:2", "gone") == "1", what="the deletion")
        assert client.hgetall("names:1") == {"version": "2", "name": "Ana Maria", "gone": "0"}
        wait_until(lambda: consumer.report() == "ok", what="healthy")

        client.flushall()  # the store loses everything: the model asks for a replay
        wait_until(lambda: client.hget("names:1", "name") == "Ana Maria", timeout=30, what="healed")
        wait_until(lambda: consumer.report() == "ok", timeout=30, what="rebuilt")
        assert client.hget("names:2", "gone") == "1"
    assert consumer.stats.ignored >= 1 and consumer.stats.dead_lettered == 0
    # --8<-- [end:names-test]


def test_the_activity_example_counts_each_change_once_and_rebuilds_from_the_history(
    producer_db, broker, private_redis, pipeline
):
    activity = example("activity")
    client = redis.Redis.from_url(private_redis, decode_responses=True)
    settings = BrokerSettings(amqp_url=broker.amqp_url, events_exchange=broker.exchange)
    consumer = activity.build(settings, client)
    relay, server, running_consumer = pipeline(consumer)
    with relay, server, running_consumer:
        wait_until(consumer.attached.is_set, what="attached")
        write(producer_db, *[("person.updated", "7", {"n": n}) for n in range(5)])
        wait_until(lambda: client.hget("activity:7", "changes") == "5", what="five changes")
        client.flushall()  # a latest-event replay would count 1: the history counts 5 again
        wait_until(lambda: consumer.report() == "ok" and client.exists("activity:7"), what="back")
        wait_until(lambda: client.hget("activity:7", "changes") == "5", what="rebuilt from history")


def test_a_consumer_with_no_web_app_says_how_it_is_over_http(broker, private_redis):
    names = example("names")
    settings = BrokerSettings(amqp_url=broker.amqp_url, events_exchange=broker.exchange)
    consumer = names.build(settings, redis.Redis.from_url(private_redis))
    broker.topologies.append(consumer.topology)
    server = serve_health(consumer, 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        assert get("/health")[0] == 200
        status, body = get("/ready")
        assert (status, json.loads(body)["reason"]) == (503, "not attached")
        with running(consumer):
            wait_until(lambda: get("/ready")[0] == 200, timeout=30, what="ready")
            status, metrics = get("/metrics")
            assert status == 200 and "consumer_messages_total" in metrics
    finally:
        server.shutdown()


def test_a_consumer_built_with_the_fewest_arguments_dead_letters_nothing_while_redis_is_stopped(
    broker,
):
    """No probe, no healing: handlers and apply only. Redis stopped for longer than the retry
    ladder, then started again: every event is applied, none is dead or retried."""
    from messaging import Consumer, ConsumerSettings, Envelope, Handlers, redis_errors
    from messaging.testing import publish
    from own_servers import OwnRedis

    server = OwnRedis()
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=1, decode_responses=True)
    handlers = Handlers()
    handlers.add(["thing.created"], lambda event, _data: event.entity_id)

    def apply(ids):
        with redis_errors():
            client.sadd("seen", *ids)

    topology = broker.topology("fewest", retry_delays=(0.2, 0.4))
    consumer = Consumer(ConsumerSettings(broker.amqp_url, topology), handlers, apply)
    events = [
        Envelope.new(event_type="thing.created", entity_id=f"t{n}", entity_version=1, data={},
                     producer="test")
        for n in range(20)
    ]  # fmt: skip
    try:
        with running(consumer):
            wait_until(consumer.attached.is_set, what="attached")
            publish(broker.amqp_url, broker.exchange, *events[:10])
            wait_until(lambda: client.scard("seen") == 10, what="the first ten")
            server.stop()
            publish(broker.amqp_url, broker.exchange, *events[10:])
            wait_until(consumer.paused.is_set, what="paused")
            over = time.monotonic() + 5 * sum(topology.retry_delays)
            wait_until(lambda: time.monotonic() > over, what="longer than the retry ladder")
            assert broker.depth(topology.dead_queue) == 0
            server.start()  # empty again: what was applied before the outage is gone with it
            wait_until(lambda: client.scard("seen") == 10, timeout=30, what="the other ten")
    finally:
        server.remove()
    assert broker.depth(topology.dead_queue) == 0
    assert consumer.stats.dead_lettered == 0 and consumer.stats.retried == 0
