"""A master of the score's Redis Cluster fails over while the consumer applies events: no
change the consumer acknowledged is missing afterwards, verification repairing what a replica
that took over had not received (the cluster: tests/support/redis_cluster.py)."""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest
from messaging import digests
from messaging.testing import InMemoryBus, MemoryProducer, wait_until
from score.config import ScoreConfig
from score.consumer import ENTITIES, build
from score.store import ScoreStore

pytestmark = pytest.mark.cluster

CONFIG = ScoreConfig(events_exchange="failover", retry_delays=(1.0, 5.0))
BATCH = 50
CHECKS = 130  # verification repairs a bucket by its second check in a row, at the latest


@pytest.mark.parametrize("how", ["planned", "crash"])
def test_a_master_failing_over_under_load_loses_no_acknowledged_change(redis_cluster, history, how):
    """planned: CLUSTER FAILOVER on the replica (it catches up first), then the old master is
    killed. crash: the master is SIGKILLed; its replica takes over once the others see it gone,
    and writes it had not received are lost: verification finds and repairs them."""
    store = ScoreStore.from_url(redis_cluster.url, f"test-{uuid.uuid4().hex[:8]}:")
    store.mark_ready()
    bus = InMemoryBus()
    consumer = bus.attach(build(CONFIG, store)[0])
    queue = consumer.topology.queue
    events = history.generate(4000)
    published = 0
    producer = MemoryProducer(bus, queue, lambda: events[:published])
    consumer.verification.request = producer
    victim = redis_cluster.master_of(store.person_key(history.cpfs[0]))

    def fail_over() -> None:
        if how == "planned":
            redis_cluster.failover(victim)
            redis_cluster.kill(victim)
        else:
            redis_cluster.crash(victim)

    failing = threading.Thread(target=fail_over, name="failover", daemon=True)
    during, rng = 0, random.Random(5)
    try:
        while published < len(events) or failing.is_alive():
            if published >= len(events) // 4 and failing.ident is None:
                failing.start()
            chunk = events[published : published + BATCH]
            published += len(chunk)
            if not chunk:  # all published, the failover still going: redeliveries
                chunk = rng.sample(events, BATCH)
            for envelope in chunk:
                bus.publish(envelope)
            during += failing.is_alive()
            deliver(bus, store)
    finally:
        if failing.ident is not None:
            failing.join(120)
    assert during > 0, "no event was applied while the master failed over"
    deliver(bus, store)
    assert bus.dead_letters(queue) == []

    # Every change the consumer acknowledged is in the model, or verification brings it back.
    checks = 0
    while digests.differing(producer_digests(producer), store.digests(ENTITIES), ENTITIES):
        assert checks < CHECKS, "verification did not repair the model"
        consumer.verification.ask()
        deliver(bus, store)
        checks += 1
    if checks and how == "planned":
        pytest.fail("a planned failover lost acknowledged changes (the replica caught up first)")
    found = {cpf: store.read(cpf) for cpf in history.cpfs}
    assert {cpf: s.score if s else None for cpf, s in found.items()} == history.expected()
    store.wipe()


def deliver(bus: InMemoryBus, store: ScoreStore) -> None:
    """Deliver until idle; while the cluster refuses (a batch held, as the runtime holds it),
    wait for the consumer's probe to pass, then go on."""
    deadline = time.monotonic() + 120
    while True:
        bus.run_until_idle(max_batch=BATCH)
        if not bus.pending():
            return
        assert time.monotonic() < deadline, "the cluster did not take writes again"
        wait_until(lambda: probe_passes(store), timeout=60, what="the store to take writes")


def probe_passes(store: ScoreStore) -> bool:
    try:
        store.consumer_probe()
    except Exception:
        return False
    return True


def producer_digests(producer: MemoryProducer) -> digests.Digests:
    return digests.of_versions(  # a deleted entity counts nothing
        (e.entity, e.entity_id, e.entity_version)
        for e in producer.latest()
        if e.change != "deleted"
    )
