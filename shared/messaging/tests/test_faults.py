"""Integration: the guarantees hold when the broker, the relay or a consumer fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pika
import psycopg
import pytest
from delivered import Seen, unpublished
from messaging import Consumer, ConsumerSettings, Envelope, Outbox, Relay, RelaySettings
from messaging.relay import APP_NAME
from messaging.testing import running, wait_until

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent


def relay_settings(db: str, broker, **overrides) -> RelaySettings:
    return RelaySettings(
        database_url=db,
        amqp_url=broker.amqp_url,
        exchange=broker.exchange,
        poll_interval=overrides.pop("poll_interval", 0.5),
        **overrides,
    )


def attached_consumer(broker, handler, service: str = "svc") -> Consumer:
    topology = broker.topology(service)
    return Consumer(ConsumerSettings(amqp_url=broker.amqp_url, topology=topology), handler)


def add_events(db: str, entity_ids: list[str], change: str = "updated") -> None:
    outbox = Outbox("test")
    with psycopg.connect(db) as conn:
        for entity_id in entity_ids:
            with conn.transaction(), conn.cursor() as cur:
                outbox.add(cur, event_type=f"thing.{change}", entity_id=entity_id, data={})


def expected(entity_ids: list[str]) -> set[tuple[str, int]]:
    versions: dict[str, int] = {}
    out = set()
    for entity_id in entity_ids:
        versions[entity_id] = versions.get(entity_id, 0) + 1
        out.add((entity_id, versions[entity_id]))
    return out


def test_versions_of_one_entity_have_no_gap_or_duplicate_under_concurrent_writers(producer_db):
    outbox = Outbox("test")

    def write(n: int) -> None:
        with psycopg.connect(producer_db) as conn:
            try:
                with conn.transaction(), conn.cursor() as cur:
                    outbox.add(cur, event_type="thing.updated", entity_id="hot", data={"n": n})
                    if n % 5 == 0:
                        raise RuntimeError("this writer rolls back")
            except RuntimeError:
                pass

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(write, range(60)))
    with psycopg.connect(producer_db) as conn:
        versions = [
            row[0]
            for row in conn.execute(
                "SELECT entity_version FROM messaging_outbox WHERE entity_id = 'hot' "
                "ORDER BY entity_version"
            )
        ]
    assert versions == list(range(1, 49))  # 60 writers, 12 rolled back


def test_event_committed_after_a_later_one_is_published_without_waiting_for_a_poll(
    producer_db, broker
):
    seen = Seen()
    consumer = attached_consumer(broker, seen)
    outbox = Outbox("test")
    with running(consumer), running(Relay(relay_settings(producer_db, broker, poll_interval=3600))):
        wait_until(consumer.attached.is_set, what="consumer attached")
        with (
            psycopg.connect(producer_db) as slow,
            psycopg.connect(producer_db) as fast,
            slow.transaction(),
            slow.cursor() as cur,
        ):
            # The slow transaction takes the lower id, then commits after the fast one.
            outbox.add(cur, event_type="thing.created", entity_id="early-id", data={})
            with fast.transaction(), fast.cursor() as cur2:
                outbox.add(cur2, event_type="thing.created", entity_id="late-id", data={})
            wait_until(lambda: ("late-id", 1) in seen.distinct(), what="the later id")
        wait_until(
            lambda: ("early-id", 1) in seen.distinct(),
            timeout=5,
            what="the lower id committed late",
        )


@pytest.mark.faults  # it stops the run's RabbitMQ,
@pytest.mark.serial  # so no other test may run beside it
@pytest.mark.containers  # with containers the outage is the node's container stopped, not its app
def test_write_during_a_broker_outage_is_published_after_it(
    producer_db, broker, restartable_broker
):
    seen = Seen()
    consumer = attached_consumer(broker, seen)
    ids = [f"e{n % 40}" for n in range(2000)]
    with running(consumer), running(Relay(relay_settings(producer_db, broker))):
        wait_until(consumer.attached.is_set, what="consumer attached")
        writer = threading.Thread(target=add_events, args=(producer_db, ids))
        writer.start()
        wait_until(lambda: seen.count() >= 200, what="the stream to flow")
        restartable_broker.stop()
        wait_until(lambda: not consumer.attached.is_set(), what="consumer to notice")
        add_events(producer_db, ["during-outage"])
        restartable_broker.start()
        writer.join()
        want = expected([*ids, "during-outage"])
        wait_until(lambda: seen.distinct() >= want, timeout=90, what="every event after restart")
        wait_until(lambda: unpublished(producer_db) == 0, what="every row marked")
    assert seen.distinct() == want


def test_relay_killed_between_publish_and_mark_publishes_again(producer_db, broker, servers):
    seen = Seen()
    consumer = attached_consumer(broker, seen)
    ids = [f"k{n}" for n in range(50)]
    add_events(producer_db, ids)
    env = {
        **os.environ,
        "DATABASE_URL": producer_db,
        "AMQP_URL": broker.amqp_url,
        "EVENTS_EXCHANGE": broker.exchange,
        "RELAY_POLL_INTERVAL": "0.5",
    }
    with running(consumer), psycopg.connect(producer_db) as locker:
        wait_until(consumer.attached.is_set, what="consumer attached")
        # Hold the rows' locks so the relay's mark waits after the broker confirmed.
        with locker.transaction():
            locker.execute("SELECT id FROM messaging_outbox FOR UPDATE")
            relay = subprocess.Popen([sys.executable, "-m", "messaging.relay"], env=env)
            try:
                wait_until(lambda: seen.distinct() == expected(ids), what="first publication")
            finally:
                relay.kill()
                relay.wait(10)
            locker.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE starts_with(application_name, %s) AND datname = current_database()",
                (APP_NAME,),
            )
        assert unpublished(producer_db) == 50  # confirmed on the wire, never marked
        with running(Relay(relay_settings(producer_db, broker))):
            wait_until(lambda: unpublished(producer_db) == 0, what="the restarted relay")
            wait_until(lambda: seen.count() >= 100, what="the duplicates")
    assert seen.distinct() == expected(ids)


def test_two_relays_never_publish_the_same_rows(producer_db, broker):
    seen = Seen()
    consumer = attached_consumer(broker, seen)
    first, second = (
        Relay(relay_settings(producer_db, broker, poll_interval=0.2)) for _ in range(2)
    )
    ids = [f"r{n % 10}" for n in range(300)]
    with running(consumer), running(first), running(second):
        wait_until(consumer.attached.is_set, what="consumer attached")
        wait_until(
            lambda: first.is_leader.is_set() or second.is_leader.is_set(), what="an elected relay"
        )
        add_events(producer_db, ids)
        wait_until(lambda: seen.distinct() == expected(ids), what="every event")
        wait_until(lambda: unpublished(producer_db) == 0, what="every row marked")
        leader, standby = (first, second) if first.is_leader.is_set() else (second, first)
        leader.stop()
        wait_until(standby.is_leader.is_set, what="the standby taking over")
        add_events(producer_db, ["after-failover"])
        wait_until(lambda: ("after-failover", 1) in seen.distinct(), what="failover publish")
    assert seen.count() == len(ids) + 1  # no duplicate in normal operation


def test_unroutable_event_is_kept_until_a_queue_is_bound(producer_db, broker):
    relay = Relay(relay_settings(producer_db, broker))
    seen = Seen()
    with running(relay):
        add_events(producer_db, ["orphan"])
        wait_until(lambda: relay.stats.failed >= 1, what="the broker returning the event")
        assert unpublished(producer_db) == 1
        with running(attached_consumer(broker, seen)):
            wait_until(
                lambda: ("orphan", 1) in seen.distinct(), timeout=60, what="the retried event"
            )
            wait_until(lambda: unpublished(producer_db) == 0, what="the row marked")


def test_compaction_keeps_the_latest_event_of_every_entity(producer_db, broker):
    settings = relay_settings(producer_db, broker, retention=timedelta(0), compact_interval=0.2)
    with running(attached_consumer(broker, Seen())), running(Relay(settings)):
        add_events(producer_db, ["a", "a", "a", "b"])

        def kept() -> list[tuple[str, int]]:
            with psycopg.connect(producer_db) as conn:
                return conn.execute(
                    "SELECT entity_id, entity_version FROM messaging_outbox ORDER BY 1"
                ).fetchall()

        wait_until(lambda: kept() == [("a", 3), ("b", 1)], what="older published events gone")


def test_sigterm_mid_batch_loses_nothing(make_database, broker, servers):
    db = make_database("consumer")
    topology = broker.topology("sig")
    script = str(HERE / "apply_consumer.py")
    args = [sys.executable, script, db, broker.amqp_url, broker.exchange, "sig"]
    conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    channel = conn.channel()
    topology.declare(conn)
    channel.confirm_delivery()
    for n in range(500):
        body = Envelope.new(
            event_type="thing.created",
            entity_id=f"s{n}",
            entity_version=1,
            data={},
            producer="test",
        ).to_json()
        channel.basic_publish(
            broker.exchange,
            "",
            body,
            pika.BasicProperties(message_id=str(uuid.uuid4()), delivery_mode=2),
        )
    conn.close()

    def applied() -> int:
        try:
            with psycopg.connect(db) as c:
                return c.execute("SELECT count(*) FROM applied").fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return 0

    first = subprocess.Popen(args)
    wait_until(lambda: applied() >= 100, what="the first consumer to get going")
    first.send_signal(signal.SIGTERM)
    assert first.wait(20) == 0
    assert applied() < 500, "the signal should land mid-stream"
    second = subprocess.Popen(args)
    try:
        wait_until(lambda: applied() == 500, timeout=60, what="the rest after restart")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0


def test_compaction_deletes_thousands_of_superseded_rows_in_one_pass(producer_db):
    from messaging.relay import RelayStats, _Compactor

    with psycopg.connect(producer_db) as conn:
        conn.execute(  # 3,000 entities with 5 published versions each, then 1 unpublished one
            """
            INSERT INTO messaging_outbox (event_id, event_type, entity, entity_id,
                                          entity_version, occurred_at, body, published_at)
            SELECT gen_random_uuid(), 'thing.updated', 'thing', 'e' || e, v, now(), '{}',
                   CASE WHEN v <= 5 THEN now() - interval '1 hour' END
            FROM generate_series(1, 3000) e, generate_series(1, 6) v ORDER BY v, e
            """
        )
    stats = RelayStats()
    settings = RelaySettings(
        database_url=producer_db,
        amqp_url="amqp://unused",
        exchange="x",
        retention=timedelta(minutes=1),
        compact_batch=1000,
    )
    compactor = _Compactor(settings, stats)
    with psycopg.connect(producer_db, autocommit=True) as db:
        while compactor.compact_once(db):
            pass
        remaining = db.execute(
            "SELECT entity_version, published_at IS NULL, count(*) FROM messaging_outbox "
            "GROUP BY 1, 2 ORDER BY 1"
        ).fetchall()
    # Everything published before the cursor reached the first unpublished row: versions 1-4
    # are superseded by a published version 5; version 5 waits for version 6 to be published.
    assert remaining == [(5, False, 3000), (6, True, 3000)]
    assert stats.compacted == 12_000
