"""The score consumer's apply logic, driven by the in-memory bus into a real Redis."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest
from messaging import Envelope, Topology
from messaging.testing import InMemoryBus, Message
from score.consumer import Applier

pytestmark = pytest.mark.integration  # the bus is in memory; the store is the real Redis

TOPOLOGY = Topology("score", "test", (1.0, 5.0))


def bus_into(store) -> InMemoryBus:
    bus = InMemoryBus()
    applier = Applier(store)
    bus.subscribe(TOPOLOGY, applier, batch_handler=applier.batch)
    return bus


def scores(store, cpfs) -> dict[str, int | None]:
    found = {cpf: store.read(cpf) for cpf in cpfs}
    return {cpf: (s.score if s else None) for cpf, s in found.items()}


def event(
    entity: str, entity_id: str, version: int, data: dict | None, change: str | None = None
) -> Envelope:
    change = change or ("deleted" if data is None else "created" if version == 1 else "updated")
    return Envelope.new(
        entity=entity,
        entity_id=entity_id,
        change=change,
        entity_version=version,
        data=data,
        producer="person",
    )


def item(kind: str, item_id: str, cpf: str, value: str, version: int = 1) -> Envelope:
    return event(kind, item_id, version, {"id": item_id, "cpf": cpf, "kind": kind, "value": value})


def test_events_in_order_give_the_expected_scores(score_store, history):
    bus = bus_into(score_store)
    for envelope in history.generate(1000):
        bus.publish(envelope)
    bus.run_until_idle(max_batch=50)
    assert scores(score_store, history.cpfs) == history.expected()


def test_duplicated_and_shuffled_delivery_converges_to_the_same_scores(score_store, history):
    events = history.generate(1000) * 2
    random.Random(3).shuffle(events)
    bus = bus_into(score_store)
    for envelope in events:
        bus.publish(envelope)
    bus.run_until_idle(max_batch=50)
    assert scores(score_store, history.cpfs) == history.expected()
    assert bus.dead_letters(TOPOLOGY.queue) == []


def test_items_arriving_before_their_person_count_once_the_person_is_known(score_store):
    bus = bus_into(score_store)
    bus.publish(item("asset", "a1", "7", "100000"))
    bus.run_until_idle()
    assert score_store.read("7") is None
    bus.publish(event("person", "7", 1, {"cpf": "7"}))
    bus.run_until_idle()
    assert score_store.read("7").score == 5000


def test_a_deleted_person_disappears_and_a_late_event_does_not_resurrect_it(score_store):
    bus = bus_into(score_store)
    for envelope in (
        event("person", "8", 1, {"cpf": "8"}),
        item("debt", "d1", "8", "1000"),
        event("person", "8", 3, None),
        event("person", "8", 2, {"cpf": "8"}, "updated"),
    ):
        bus.publish(envelope)
    bus.run_until_idle()
    assert score_store.read("8") is None


def test_two_people_have_independent_scores(score_store):
    bus = bus_into(score_store)
    for cpf in ("1", "2"):
        bus.publish(event("person", cpf, 1, {"cpf": cpf}))
    bus.publish(item("asset", "x1", "1", "100000"))
    bus.publish(item("income", "x2", "2", "1000"))
    bus.run_until_idle()
    assert (score_store.read("1").score, score_store.read("2").score) == (5000, 20)


def test_totals_are_exact_decimals(score_store):
    bus = bus_into(score_store)
    bus.publish(event("person", "9", 1, {"cpf": "9"}))
    for n in range(3):
        bus.publish(item("income", f"i{n}", "9", "0.10"))
    bus.run_until_idle()
    assert score_store.read("9").incomes == Decimal("0.30")


def test_an_item_event_without_a_value_is_dead_lettered_and_the_rest_flows(score_store):
    bus = bus_into(score_store)
    bad = event("asset", "bad", 1, {"id": "bad", "cpf": "5"})
    bus.publish(bad)
    bus.publish(Message(b"{not json", "m1"))
    bus.publish(event("person", "5", 1, {"cpf": "5"}))
    bus.run_until_idle()
    dead = bus.dead_letters(TOPOLOGY.queue)
    assert [m.headers["x-exception-type"] for m in dead] == ["PermanentError", "DecodeError"]
    assert score_store.read("5").score == 0


def test_scripts_lost_by_redis_are_loaded_again_and_each_change_applies_once(score_store):
    applier = Applier(score_store)
    applier.batch([event("person", "7", 1, {"cpf": "7"}), item("income", "i7", "7", "1000.00")])
    score_store.client.script_flush()  # as after a Redis restart
    applier.batch([item("income", "i7", "7", "1000.00"), item("asset", "a7", "7", "500.00")])
    found = score_store.read("7")
    assert (found.incomes, found.assets) == (Decimal("1000.00"), Decimal("500.00"))
