"""A store outage is no message's fault, however it looks and however long it lasts: the
consumer holds what it has, never counts a delivery for it, backs off, and applies everything
afterwards. And no state of the runtime is one it cannot leave by itself. Against the real
RabbitMQ."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from messaging import (
    Consumer,
    ConsumerSettings,
    Envelope,
    Handlers,
    RetryableError,
    StoreUnavailable,
)
from messaging.healing import READY, REBUILDING, Healing
from messaging.processing import Processor
from messaging.replay import replay
from messaging.testing import MemoryGeneration, running, wait_until
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


def envelope(entity_id: str, version: int = 1, event_type: str = "thing.created") -> Envelope:
    return Envelope.new(
        event_type=event_type, entity_id=entity_id, entity_version=version, data={}, producer="t"
    )


class RefusingStore:
    """A store that answers (its probe passes: it can read) but refuses every write while
    `refusing` is set, as Redis at maxmemory or a read-only database does."""

    def __init__(self) -> None:
        self.refusing = threading.Event()
        self.applied: list[str] = []
        self.attempts = 0

    def handle(self, env: Envelope) -> None:
        self.attempts += 1
        if self.refusing.is_set():
            raise StoreUnavailable("OOM command not allowed when used memory > 'maxmemory'")
        self.applied.append(env.entity_id)

    def read_probe(self) -> None:
        """Passes while writes fail: the probe the old runtime resumed on at once."""


def test_a_store_that_answers_but_refuses_writes_dead_letters_nothing_however_often_it_fails(
    broker,
):
    store = RefusingStore()
    topology = broker.topology("refusing")
    consumer = Consumer(
        # Two deliveries would be the limit: pausing must never count one.
        ConsumerSettings(broker.amqp_url, topology, max_redeliveries=2, pause_backoff_cap=0.5),
        store.handle,
        probe=store.read_probe,
    )
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        store.refusing.set()
        broker.publish(*[envelope(f"r{n}") for n in range(20)])
        wait_until(lambda: store.attempts >= 6, what="six failed tries of the held batch")
        assert consumer.health().startswith("paused: the store is away or refuses writes (OOM")
        assert broker.depth(topology.dead_queue) == 0
        store.refusing.clear()
        wait_until(lambda: len(set(store.applied)) == 20, what="everything applied after")
        assert consumer.health() is None
    assert broker.depth(topology.dead_queue) == 0
    assert consumer.stats.dead_lettered == 0 and consumer.stats.paused == 1


def test_a_consumer_built_without_a_probe_dead_letters_nothing_during_an_outage(broker):
    """The fewest arguments the API allows: no probe. The held batch is its own probe."""
    store = RefusingStore()
    topology = broker.topology("no-probe", retry_delays=(0.1, 0.1))
    consumer = Consumer(
        ConsumerSettings(broker.amqp_url, topology, pause_backoff_cap=0.4), store.handle
    )
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        store.refusing.set()
        broker.publish(*[envelope(f"n{n}") for n in range(10)])
        over = time.monotonic() + 3.0  # far past the retry ladder
        wait_until(lambda: time.monotonic() > over, what="the outage")
        assert broker.depth(topology.dead_queue) == 0
        store.refusing.clear()
        wait_until(lambda: len(set(store.applied)) == 10, what="applied after the outage")
    assert broker.depth(topology.dead_queue) == 0 and consumer.stats.retried == 0


def test_the_held_batch_is_tried_again_with_growing_waits_not_in_a_hot_loop(broker):
    store = RefusingStore()
    topology = broker.topology("backoff")
    consumer = Consumer(
        ConsumerSettings(broker.amqp_url, topology, pause_backoff_cap=30.0),
        store.handle,
        probe=store.read_probe,
    )
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        store.refusing.set()
        broker.publish(envelope("one"))
        wait_until(lambda: store.attempts >= 1, what="the first try")
        over = time.monotonic() + 4.0
        wait_until(lambda: time.monotonic() > over, what="four seconds of outage")
        # Waits of about 0.5, 1, 2, 4 s: at most five tries in four seconds, not thousands.
        assert 2 <= store.attempts <= 5
        store.refusing.clear()
        wait_until(lambda: store.applied == ["one"], timeout=30, what="applied after")


def test_a_pause_longer_than_the_hold_limit_gives_back_what_it_holds_without_counting(
    broker, caplog
):
    store = RefusingStore()
    topology = broker.topology("long-pause")
    consumer = Consumer(
        ConsumerSettings(
            broker.amqp_url,
            topology,
            hold_limit=0.5,
            max_redeliveries=1,
            pause_backoff_cap=0.3,
        ),
        store.handle,
        probe=store.read_probe,
    )
    with caplog.at_level(logging.INFO, logger="messaging.consumer"), running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        store.refusing.set()
        broker.publish(*[envelope(f"h{n}") for n in range(5)])
        wait_until(lambda: caplog.text.count("held message(s) back") >= 3, what="three give-backs")
        store.refusing.clear()
        wait_until(lambda: len(set(store.applied)) == 5, what="applied after the pause")
    assert broker.depth(topology.dead_queue) == 0  # a given-back copy starts its count again


def test_a_pause_outlives_its_connection_and_consuming_comes_back_by_itself(broker):
    """The held batch goes back with a connection that dies during the pause; the new session
    consumes again with no resume to lose."""
    store = RefusingStore()
    proxy = TcpProxy.before(broker.amqp_url)
    topology = broker.topology("lost-resume")
    consumer = Consumer(
        ConsumerSettings(proxy.url(broker.amqp_url), topology, heartbeat=2),
        store.handle,
        probe=store.read_probe,
    )
    try:
        with running(consumer):
            wait_until(consumer.attached.is_set, what="attached")
            store.refusing.set()
            broker.publish(envelope("held"))
            wait_until(consumer.paused.is_set, what="paused")
            proxy.cut()
            wait_until(lambda: not consumer.attached.is_set(), what="the connection lost")
            store.refusing.clear()
            proxy.restore()
            wait_until(lambda: "held" in store.applied, timeout=30, what="applied after both")
            wait_until(lambda: consumer.health() is None, what="healthy")
    finally:
        proxy.close()
    assert broker.depth(topology.dead_queue) == 0


class Handled:
    def __init__(self, exit_on: str | None = None) -> None:
        self.ids: list[str] = []
        self.exit_on = exit_on

    def __call__(self, env: Envelope) -> None:
        if env.entity_id == self.exit_on:
            raise SystemExit("a handler that would end its thread")
        self.ids.append(env.entity_id)


def test_a_handler_that_raises_system_exit_fails_only_its_own_message(broker):
    handled = Handled(exit_on="boom")
    topology = broker.topology("exiting", retry_delays=(0.1,))
    consumer = Consumer(ConsumerSettings(broker.amqp_url, topology), handled)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        broker.publish(envelope("boom"), envelope("mate"), envelope("after"))
        wait_until(lambda: broker.depth(topology.dead_queue) == 1, what="boom dead-lettered")
        assert consumer.health() is None
    assert sorted(handled.ids) == ["after", "mate"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_batch_whose_worker_died_is_never_acknowledged_unapplied(broker, monkeypatch):
    """Something escapes every guard and ends the worker mid-batch (a bug of ours): no later
    acknowledgement, which is cumulative, may settle what it held."""
    handled = Handled()
    topology = broker.topology("contained")
    consumer = Consumer(ConsumerSettings(broker.amqp_url, topology), handled)
    real, killed = Processor._judge, []

    def judge(self, delivery):
        if b'"boom"' in delivery.body and not killed:
            killed.append(1)
            raise SystemExit("escapes the guards")
        return real(self, delivery)

    monkeypatch.setattr(Processor, "_judge", judge)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        broker.publish(envelope("boom"), envelope("mate"))
        broker.publish(envelope("after"))
        wait_until(lambda: {"boom", "mate", "after"} <= set(handled.ids), what="all applied")
    assert killed and broker.depth(topology.dead_queue) == 0


def test_only_the_declared_event_types_reach_the_handler_the_rest_are_counted_ignored(broker):
    handled = Handled()
    topology = broker.topology("filtered")
    handlers = Handlers()
    handlers.add(["thing.created"], lambda event, _data: handled(event))
    consumer = Consumer(ConsumerSettings(broker.amqp_url, topology), handlers)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        broker.publish(
            envelope("other", event_type="other.created"),
            envelope("wanted"),
            envelope("x", 2, "thing.updated"),
        )
        wait_until(lambda: consumer.stats.ignored == 2 and handled.ids, what="settled")
    assert handled.ids == ["wanted"]
    assert consumer.stats.consumed == 1 and consumer.stats.dead_lettered == 0


class BlippingGeneration(MemoryGeneration):
    """A generation store whose completion meets a store blip once."""

    def __init__(self) -> None:
        super().__init__()
        self.blips = 1

    def finish_rebuild(self, request_id: str, events: int) -> bool:
        if self.blips:
            self.blips -= 1
            raise StoreUnavailable("redis: connection reset")
        return super().finish_rebuild(request_id, events)


def test_a_replay_completion_that_meets_a_store_blip_waits_and_is_never_dead_lettered(
    producer_db, broker
):
    import psycopg
    from messaging import Outbox

    with psycopg.connect(producer_db) as conn, conn.cursor() as cur:
        Outbox("t").add(cur, event_type="thing.created", entity_id="a", data={})
    store = BlippingGeneration()
    topology = broker.topology("blip")
    healing = Healing(store, broker.amqp_url, broker.exchange, topology.queue)
    consumer = Consumer(
        ConsumerSettings(broker.amqp_url, topology), lambda env: None, healing=healing
    )
    # The rebuild is under way before the consumer starts: with no marker at all, its healing
    # would claim one and ask for a replay of its own, whose marker could overwrite r1's.
    store.begin_rebuild("r1", time.time())
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        replay(producer_db, broker.amqp_url, topology.queue, request_id="r1")
        wait_until(lambda: store.marker.state == READY, timeout=30, what="ready after the blip")
    assert broker.depth(topology.dead_queue) == 0 and store.blips == 0


def test_the_model_is_ready_only_once_every_replayed_event_is_applied(producer_db, broker):
    """A replayed event that failed once waits in a retry queue while the completion arrives:
    the model stays rebuilding until it is applied."""
    import psycopg
    from messaging import Outbox

    with psycopg.connect(producer_db) as conn, conn.cursor() as cur:
        for entity_id in ("a", "slow", "b"):
            Outbox("t").add(cur, event_type="thing.created", entity_id=entity_id, data={})
    release, tries = threading.Event(), []

    def handler(env: Envelope) -> None:
        if env.entity_id == "slow":
            tries.append(1)
            if len(tries) == 1:
                raise RetryableError("a transient conflict")
            release.wait(30)

    store = MemoryGeneration()
    topology = broker.topology("counted", retry_delays=(0.2,))
    healing = Healing(store, broker.amqp_url, broker.exchange, topology.queue)
    consumer = Consumer(ConsumerSettings(broker.amqp_url, topology), handler, healing=healing)
    store.begin_rebuild("r2", time.time())  # before the start: see the test above
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")
        replay(producer_db, broker.amqp_url, topology.queue, request_id="r2")
        wait_until(lambda: store.expected == 3 and len(tries) == 2, what="completion, retry")
        assert store.marker.state == REBUILDING  # 'slow' is still being applied
        release.set()
        wait_until(lambda: store.marker.state == READY, what="ready once all are applied")
    assert store.settled == 3
