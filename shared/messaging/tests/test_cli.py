"""The operator's command against the real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pika
import psycopg
import pytest
from messaging import Consumer, ConsumerSettings, Envelope, Outbox, PermanentError
from messaging.cli import main
from messaging.testing import running, wait_until

pytestmark = pytest.mark.integration


class Buggy:
    """A handler with a bug for some events, until it is fixed; records what it applied."""

    def __init__(self) -> None:
        self.fixed = False
        self.applied: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, envelope: Envelope) -> None:
        if not self.fixed and envelope.data and envelope.data.get("odd"):
            raise PermanentError("cannot handle odd things yet")
        with self.lock:
            self.applied.append((envelope.entity_id, envelope.entity_version))


def event(entity_id: str, odd: bool) -> Envelope:
    return Envelope.new(
        event_type="thing.updated",
        entity_id=entity_id,
        entity_version=1,
        data={"odd": odd},
        producer="test",
        correlation_id="cli-test",
    )


@contextmanager
def attached(consumer: Consumer) -> Iterator[Consumer]:
    """The consumer running, its queues declared and consumed."""
    with running(consumer):
        wait_until(consumer.attached.is_set, what="the consumer attached")
        yield consumer


@pytest.fixture
def amqp_env(broker, monkeypatch):
    monkeypatch.setenv("AMQP_URL", broker.amqp_url)
    return broker


def test_a_message_dead_by_a_bug_is_listed_shown_and_replayed_once_after_the_fix(amqp_env, capsys):
    broker = amqp_env
    topology = broker.topology("cli")
    handler = Buggy()
    first, second, fine = event("a", True), event("b", True), event("c", False)
    with attached(Consumer(ConsumerSettings(broker.amqp_url, topology), handler)):
        broker.publish(first, second, fine)
        wait_until(lambda: broker.depth(topology.dead_queue) == 2, what="two dead messages")
        assert handler.applied == [("c", 1)]

        assert main(["dlq", "list", topology.queue]) == 0
        listing = capsys.readouterr().out
        assert f"{topology.dead_queue}: 2 dead message(s)" in listing
        assert "     2  PermanentError: cannot handle odd things yet  oldest " in listing

        assert main(["dlq", "show", topology.dead_queue, "--id", str(first.event_id)]) == 0
        shown = capsys.readouterr().out
        assert f"message_id: {first.event_id}" in shown
        assert "x-dead-reason: PermanentError: cannot handle odd things yet" in shown
        assert '"entity_id": "a"' in shown
        assert broker.depth(topology.dead_queue) == 2  # looking takes nothing away

        handler.fixed = True  # the fix is deployed
        assert main(["dlq", "replay", topology.dead_queue, "--id", str(first.event_id)]) == 0
        wait_until(lambda: ("a", 1) in handler.applied, what="the replayed message applied")
        assert broker.depth(topology.dead_queue) == 1  # the other one waits for its turn

        assert main(["dlq", "replay", topology.queue, "--all"]) == 0
        wait_until(lambda: ("b", 1) in handler.applied, what="the rest applied")
        assert broker.depth(topology.dead_queue) == 0
    assert sorted(handler.applied) == [("a", 1), ("b", 1), ("c", 1)]  # each exactly once


def test_replaying_an_id_that_is_not_there_says_so(amqp_env, capsys):
    topology = amqp_env.topology("cli")
    with attached(Consumer(ConsumerSettings(amqp_env.amqp_url, topology), Buggy())):
        pass  # declares the queues
    assert main(["dlq", "replay", topology.dead_queue, "--id", "nope"]) == 1
    assert "replayed 0 message(s)" in capsys.readouterr().out


def test_purge_needs_yes_and_empties_the_dead_queue(amqp_env, capsys):
    broker = amqp_env
    topology = broker.topology("cli")
    with attached(Consumer(ConsumerSettings(broker.amqp_url, topology), Buggy())):
        broker.publish(event("x", True))
        wait_until(lambda: broker.depth(topology.dead_queue) == 1, what="a dead message")
    with pytest.raises(SystemExit):
        main(["dlq", "purge", topology.dead_queue])
    assert broker.depth(topology.dead_queue) == 1
    assert main(["dlq", "purge", topology.dead_queue, "--yes"]) == 0
    assert "purged 1 message(s)" in capsys.readouterr().out
    assert broker.depth(topology.dead_queue) == 0


def test_outbox_status_and_replay_of_the_latest_state(producer_db, amqp_env, monkeypatch, capsys):
    broker = amqp_env
    monkeypatch.setenv("DATABASE_URL", producer_db)
    outbox = Outbox("test")
    with psycopg.connect(producer_db) as conn:
        for entity_id, changes in (("p", ("created", "updated", "updated")), ("q", ("created",))):
            for change in changes:
                with conn.transaction(), conn.cursor() as cur:
                    outbox.add(cur, event_type=f"thing.{change}", entity_id=entity_id, data={})
    assert main(["outbox", "status"]) == 0
    status = capsys.readouterr().out
    assert "unpublished: 4" in status and "last published: never" in status

    topology = broker.topology("rebuild")
    seen = []
    with attached(Consumer(ConsumerSettings(broker.amqp_url, topology), seen.append)):
        assert main(["replay", "--to", topology.queue]) == 0
        assert "replayed 2 event(s)" in capsys.readouterr().out
        wait_until(lambda: len(seen) == 2, what="the latest state of both")
        assert sorted((e.entity_id, e.entity_version) for e in seen) == [("p", 3), ("q", 1)]

        assert main(["replay", "--to", topology.queue, "--since", "2000-01-01"]) == 0
        wait_until(lambda: len(seen) == 6, what="the whole log")
    assert main(["replay", "--to", "no-such-queue"]) == 2  # a typo publishes nothing


def test_unreachable_broker_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2F")
    assert main(["dlq", "list", "anything"]) == 2
    assert "cannot connect" in capsys.readouterr().err


def test_show_prints_undecodable_bodies_without_failing(amqp_env, capsys):
    broker = amqp_env
    topology = broker.topology("cli")
    with attached(Consumer(ConsumerSettings(broker.amqp_url, topology), Buggy())):
        conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
        conn.channel().basic_publish(broker.exchange, "", b"\xff not json")
        conn.close()
        wait_until(lambda: broker.depth(topology.dead_queue) == 1, what="a dead message")
    assert main(["dlq", "show", topology.dead_queue]) == 0
    out = capsys.readouterr().out
    assert "DecodeError" in out and "not json" in out


def add_events(url: str, *entity_ids: str) -> None:
    with psycopg.connect(url) as conn, conn.transaction(), conn.cursor() as cur:
        for entity_id in entity_ids:
            Outbox("test").add(cur, event_type="thing.updated", entity_id=entity_id, data={})


def test_a_replay_after_a_noted_position_sends_what_was_written_since(
    producer_db, amqp_env, monkeypatch, capsys
):
    monkeypatch.setenv("DATABASE_URL", producer_db)
    add_events(producer_db, "before-1", "before-2")
    assert main(["outbox", "status"]) == 0
    noted = re.search(r"^position: (\d+)", capsys.readouterr().out, re.MULTILINE).group(1)
    assert noted == "2"
    add_events(producer_db, "after-1", "after-2")

    topology = amqp_env.topology("repair")
    seen = []
    with attached(Consumer(ConsumerSettings(amqp_env.amqp_url, topology), seen.append)):
        assert main(["replay", "--to", topology.queue, "--after-id", noted]) == 0
        assert "replayed 2 event(s)" in capsys.readouterr().out
        wait_until(lambda: len(seen) == 2, what="the events after the position")
    assert sorted(e.entity_id for e in seen) == ["after-1", "after-2"]


def test_a_replay_since_a_time_goes_by_when_events_were_published_not_by_the_writers_clock(
    producer_db, amqp_env, monkeypatch, capsys
):
    monkeypatch.setenv("DATABASE_URL", producer_db)
    add_events(producer_db, "old", "late-writer", "unpublished")
    with psycopg.connect(producer_db) as conn:
        [(db_now,)] = conn.execute("SELECT now()").fetchall()
        conn.execute(
            "UPDATE messaging_outbox SET published_at = now() - interval '1 hour' "
            "WHERE entity_id = 'old'"
        )
        # Written by a host whose clock was a day behind, published just now.
        conn.execute(
            "UPDATE messaging_outbox SET occurred_at = now() - interval '1 day', "
            "published_at = now() WHERE entity_id = 'late-writer'"
        )
    since = (db_now - timedelta(minutes=5)).isoformat()
    topology = amqp_env.topology("repair")
    seen = []
    with attached(Consumer(ConsumerSettings(amqp_env.amqp_url, topology), seen.append)):
        assert main(["replay", "--to", topology.queue, "--since", since]) == 0
        wait_until(lambda: len(seen) == 2, what="the events published since then")
    assert sorted(e.entity_id for e in seen) == ["late-writer", "unpublished"]
    with pytest.raises(SystemExit):  # one or the other
        main(["replay", "--to", topology.queue, "--since", since, "--after-id", "1"])
