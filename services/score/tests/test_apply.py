"""The score consumer's apply logic, driven by the in-memory bus into a real Redis; its
tombstones and their retention."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import uuid
from decimal import Decimal

import pytest
from messaging import Envelope, digests
from messaging.testing import InMemoryBus, Message, wait_until
from score.config import ScoreConfig
from score.consumer import HANDLERS, build
from score.retention import pruner
from score.store import ScoreStore

pytestmark = pytest.mark.integration  # the bus is in memory; the store is the real Redis

CONFIG = ScoreConfig(events_exchange="test", retry_delays=(1.0, 5.0))
TOPOLOGY = CONFIG.topology("score")


def bus_into(store) -> InMemoryBus:
    """The in-memory broker in front of the consumer the process builds, on this store."""
    bus = InMemoryBus()
    bus.attach(build(CONFIG, store)[0])
    return bus


def apply(store, events: list[Envelope]) -> None:
    """The events translated by the consumer's declared handlers, applied as one batch."""
    store.apply([HANDLERS.translate(e) for e in events])


def scores(store, cpfs) -> dict[str, int | None]:
    found = {cpf: store.read(cpf) for cpf in cpfs}
    return {cpf: (s.score if s else None) for cpf, s in found.items()}


def event(
    entity: str, entity_id: str, version: int, data: dict | None, change: str | None = None
) -> Envelope:
    change = change or ("deleted" if data is None else "created" if version == 1 else "updated")
    return Envelope.new(
        event_type=f"{entity}.{change}",
        entity_id=entity_id,
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
    apply(
        score_store, [event("person", "7", 1, {"cpf": "7"}), item("income", "i7", "7", "1000.00")]
    )
    score_store.client.script_flush()  # as after a Redis restart
    apply(score_store, [item("income", "i7", "7", "1000.00"), item("asset", "a7", "7", "500.00")])
    found = score_store.read("7")
    assert (found.incomes, found.assets) == (Decimal("1000.00"), Decimal("500.00"))


def test_an_item_worth_zero_counts_as_zero_and_its_score_reads(score_store):
    bus = bus_into(score_store)
    bus.publish(event("person", "10", 1, {"cpf": "10"}))
    bus.publish(item("income", "z1", "10", "0.00"))
    bus.publish(item("debt", "z2", "10", "0"))
    bus.publish(item("asset", "z3", "10", "100.00"))
    bus.run_until_idle()
    found = score_store.read("10")
    assert (found.score, found.incomes, found.debts) == (5, Decimal("0.00"), Decimal("0"))


@pytest.mark.parametrize(
    "value",
    ["1E+30", "1e3", "-5.00", "1.001", "0x10", "NaN", "Infinity", " 5", "1" * 16, "", "1_000"],
)
def test_an_item_value_the_producer_could_not_have_written_is_dead_lettered(score_store, value):
    bus = bus_into(score_store)
    bus.publish(event("person", "12", 1, {"cpf": "12"}))
    bus.publish(item("income", "crafted", "12", value))
    bus.publish(item("income", "fine", "12", "100.00"))
    bus.run_until_idle()
    [dead] = bus.dead_letters(TOPOLOGY.queue)
    assert "data: value: String should match pattern" in dead.headers["x-dead-reason"]
    assert score_store.read("12").incomes == Decimal("100.00")


@pytest.mark.parametrize("value", [5, 5.0, None, [], {"v": 1}])
def test_an_item_value_that_is_not_text_is_dead_lettered(score_store, value):
    bus = bus_into(score_store)
    bus.publish(event("income", "typed", 1, {"id": "typed", "cpf": "13", "value": value}))
    bus.run_until_idle()
    assert len(bus.dead_letters(TOPOLOGY.queue)) == 1


def test_a_replayed_item_whose_set_entry_a_wipe_removed_counts_again(score_store):
    """A wipe runs in passes under live traffic: an item applied between its passes keeps its
    hash (too new for the wipe) but can lose its entry in the person's set. The replay's event
    for it is skipped by the version gate, which repairs the membership."""
    created = item("income", "kept", "14", "1000.00")
    apply(score_store, [event("person", "14", 1, {"cpf": "14"}), created])
    score_store.client.unlink(score_store.items_key("14"))
    assert score_store.read("14").incomes == Decimal("0.00")

    apply(score_store, [created])  # the replay: same version, skipped by the gate

    assert score_store.read("14").incomes == Decimal("1000.00")


def test_a_replayed_deletion_removes_an_entry_the_wipe_left_behind(score_store):
    created = item("income", "gone", "15", "1000.00")
    deleted = event("income", "gone", 2, None)
    apply(score_store, [event("person", "15", 1, {"cpf": "15"}), created, deleted])
    score_store.client.sadd(score_store.items_key("15"), "gone")  # stale entry
    assert score_store.read("15").incomes == Decimal("0.00")  # the item's hash says deleted
    apply(score_store, [deleted])
    assert score_store.client.smembers(score_store.items_key("15")) == set()


def test_an_interrupted_wipe_is_taken_over_and_the_model_heals(score_store, broker):
    """A wipe whose process restarted leaves `wiping` behind: healing takes it over once stale."""
    from messaging.healing import REBUILDING, Healing

    score_store.client.hset(
        score_store.generation_key, mapping={"state": "wiping", "request": "wipe-1", "since": 0}
    )
    healing = Healing(score_store.marker, broker.amqp_url, broker.exchange, "score.q")
    assert healing.check() == REBUILDING
    marker = score_store.generation()
    assert marker.state == REBUILDING and marker.request_id != "wipe-1"


def test_a_wipe_in_progress_is_not_taken_over(score_store, broker):
    import time

    from messaging.healing import WIPING, Healing

    score_store.client.hset(
        score_store.generation_key,
        mapping={"state": "wiping", "request": "wipe-2", "since": time.time()},
    )
    assert (
        Healing(score_store.marker, broker.amqp_url, broker.exchange, "score.q").check() == WIPING
    )


def test_a_wipe_stops_when_its_marker_was_taken_over(score_store):
    from score.store import StaleWipe

    apply(score_store, [event("person", str(n), 1, {"cpf": str(n)}) for n in range(1500)])
    marker, real = score_store.marker, score_store.marker.renew_wipe

    def taken_over(wipe_id, now):
        score_store.client.delete(score_store.generation_key)  # another process took it
        return real(wipe_id, now)

    marker.renew_wipe = taken_over
    try:
        with pytest.raises(StaleWipe):
            score_store.wipe()
    finally:
        marker.renew_wipe = real


def test_keys_that_hold_no_digest_fields_count_as_missing_and_the_check_goes_on(score_store):
    """A key of another type, or fields written by hand, under the model's prefix: the digest
    leaves them out (their bucket differs and is reported) instead of failing every check."""
    apply(score_store, [event("person", "1", 1, {"cpf": "1", "name": "A"})])
    good = score_store.digests({"person"})
    client = score_store.client
    client.set(score_store.person_key("not-a-hash"), "x")
    for cpf, fields in {
        "2": {"entity": "person", "b": "7", "h": "abc"},
        "3": {"entity": "person", "b": "7", "h": "1e400"},
        "4": {"entity": "person", "b": "-1", "h": "5"},
        "5": {"entity": "person", "b": "2.5", "h": "5"},
    }.items():
        client.hset(score_store.person_key(cpf), mapping=fields)
    assert score_store.digests({"person"}) == good
    bucket = digests.bucket("person", "1")
    assert score_store.held_versions("person", [bucket, 7]) == {"1": 1}  # for the report


def test_an_item_deleted_before_its_creation_arrives_never_counts(score_store):
    apply(score_store, [event("person", "16", 1, {"cpf": "16"})])
    apply(score_store, [event("income", "late", 2, None)])  # the deletion, first
    apply(score_store, [item("income", "late", "16", "1000.00")])  # then its creation
    assert score_store.read("16").incomes == Decimal("0.00")
    assert score_store.client.smembers(score_store.items_key("16")) == set()


def test_the_keys_of_a_person_share_a_slot_and_every_key_a_script_touches_is_named(score_store):
    """What a Redis Cluster asks of the model: a person's keys in one slot (hash tags), and
    scripts whose every command works on a key they were given (none built inside)."""
    from redis.crc import key_slot
    from score import store

    slots = {
        key_slot(k.encode()) for k in (score_store.person_key("7"), score_store.items_key("7"))
    }
    assert len(slots) == 1
    scripts = (store._APPLY_PERSON, store._APPLY_ITEM, store._INDEX_ITEM, store._READ_PERSON)
    for script in (*scripts, store._PRUNE_TOMBSTONE):
        targets = re.findall(r"redis\.call\('\w+', ([^,)]+)", script)
        assert targets and all(target.startswith("KEYS[") for target in targets), targets


def test_a_store_of_the_layout_before_hash_tags_heals_by_a_replay(redis_client):
    """Layout 1 (no hash tags) kept its marker at `<prefix>generation`: a store upgraded over it
    finds no marker of its own layout, so the consumer asks for a replay, and verification
    does not count the old keys."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    redis_client.hset(f"{prefix}generation", mapping={"state": "ready", "request": ""})
    redis_client.hset(
        f"{prefix}person:7",
        mapping={"version": 1, "deleted": 0, "entity": "person", "b": 1, "h": 5},
    )
    store = ScoreStore(redis_client, prefix)
    try:
        assert store.generation() is None
        assert store.digests({"person"}) == {}
    finally:
        store.wipe()
    assert list(redis_client.scan_iter(match=f"{prefix}*")) == []  # the wipe took the old keys


def test_a_key_prefix_with_a_brace_is_refused():
    with pytest.raises(ValueError, match="SCORE_KEY_PREFIX must hold no"):
        ScoreConfig(score_key_prefix="score{x}:")


def test_on_a_cluster_a_live_item_its_persons_set_lost_counts_as_missing(score_store):
    """A person's set and its items are on different masters of a cluster, which fail over
    apart: verification counts a live item its set lost as missing, so its bucket is repaired
    (the replayed creation adds it back). On one Redis the set gains the item before the item is
    written, in the one replication stream: a replica that lost the entry lost the item too."""
    if not score_store.cluster:
        pytest.skip("a Redis Cluster's own case")
    created = item("income", "kept", "17", "1000.00")
    apply(score_store, [event("person", "17", 1, {"cpf": "17"}), created])
    whole = score_store.digests({"income"})
    score_store.client.unlink(score_store.items_key("17"))
    assert score_store.digests({"income"}) == {}
    assert score_store.read("17").incomes == Decimal("0.00")
    apply(score_store, [created])  # what the repair replays: the item's latest event
    assert score_store.digests({"income"}) == whole
    assert score_store.read("17").incomes == Decimal("1000.00")


# -- tombstones: kept for TOMBSTONE_RETENTION_DAYS, then pruned by the consumer's retention, without
# moving a digest; a late older event before that is refused -----------------------------------
ENTITIES = {"person", "income", "asset", "debt"}


def applied(store, events: list[Envelope]) -> list[bool]:
    """apply(), saying which events were newer than what the store held."""
    return store.apply([HANDLERS.translate(e) for e in events])


def delete_person_with_an_item(store, cpf: str, item_id: str) -> None:
    apply(store, [event("person", cpf, 1, {"cpf": cpf}), item("income", item_id, cpf, "100.00")])
    apply(store, [event("income", item_id, 2, None), event("person", cpf, 2, None)])


def age(store, keys: list[str], days: float) -> None:
    """Make these tombstones `days` older, as the clock would."""
    for key in keys:
        at = float(store.client.hget(key, "at")) - days * 86_400
        store.client.hset(key, "at", at)
        store.client.zadd(store.tombstones_key, {key: at})


def held(store) -> set[str]:
    return {key.decode() for key in store.client.scan_iter(match=f"{store.prefix}*", count=1000)}


def retention_config(**changes) -> ScoreConfig:
    return ScoreConfig(events_exchange="test", tombstone_retention_days=30, **changes)


def test_a_tombstone_refuses_a_late_older_event_until_its_retention_prunes_it(score_store):
    s = score_store
    delete_person_with_an_item(s, "1", "i1")
    delete_person_with_an_item(s, "2", "i2")
    apply(s, [event("person", "3", 1, {"cpf": "3"}), item("income", "i3", "3", "1")])
    assert applied(s, [event("person", "1", 1, {"cpf": "1"})]) == [False]
    age(s, [s.person_key("1"), s.item_key("i1")], 31)
    age(s, [s.person_key("2"), s.item_key("i2")], 29)
    before = s.digests(ENTITIES)

    pruned = pruner(retention_config(retention_batch=1), s).run_once()

    assert pruned == {"tombstones": 2}  # one at a time
    assert {s.person_key("1"), s.item_key("i1")}.isdisjoint(held(s))
    assert {s.person_key("2"), s.item_key("i2")} <= held(s)
    assert s.client.zcard(s.tombstones_key) == 2  # the pruned ones left the index
    # a tombstone counts nothing: the digests are the live entities', before and after
    assert s.digests(ENTITIES) == before
    assert before == digests.of_versions([("person", "3", 1), ("income", "i3", 1)])
    assert s.held_versions("person", list(range(digests.BUCKETS))) == {"3": 1}
    # past its retention, a late older event is taken (verification mends it: the producer
    # counts the person deleted, and its repair replays the deletion)
    assert applied(s, [event("person", "1", 1, {"cpf": "1"})]) == [True]
    assert s.read("1") is not None
    assert applied(s, [event("person", "1", 2, None)]) == [True]
    assert s.read("1") is None


def test_an_entity_re_created_or_deleted_again_is_not_pruned_for_its_old_deletion(score_store):
    s = score_store
    delete_person_with_an_item(s, "1", "i1")
    delete_person_with_an_item(s, "2", "i2")
    stale = [s.person_key("1"), s.person_key("2")]
    due = s.due_tombstones(0, [], 10)
    assert set(due) == {*stale, s.item_key("i1"), s.item_key("i2")}
    apply(s, [event("person", "1", 3, {"cpf": "1"})])  # re-created
    age(s, [s.person_key("2")], 31)
    apply(s, [event("person", "2", 3, {"cpf": "2"}), event("person", "2", 4, None)])

    assert s.prune_tombstones(86_400, stale) == 0

    assert s.read("1") is not None
    assert s.client.hget(s.person_key("2"), "deleted") == b"1"
    assert s.client.zscore(s.tombstones_key, s.person_key("1")) is None
    # deleted again since: it stays in the index, at its new time
    assert s.client.zscore(s.tombstones_key, s.person_key("2")) == float(
        s.client.hget(s.person_key("2"), "at")
    )


def test_a_deletion_whose_index_entry_was_lost_joins_the_index_when_delivered_again(score_store):
    """The index is written in a second round trip: a consumer stopped between the two leaves a
    tombstone out of it, and the deletion's redelivery (not acknowledged) puts it in."""
    s = score_store
    delete_person_with_an_item(s, "1", "i1")
    s.client.delete(s.tombstones_key)
    apply(s, [event("income", "i1", 2, None), event("person", "1", 2, None)])  # redelivered
    assert set(s.due_tombstones(0, [], 10)) == {s.person_key("1"), s.item_key("i1")}


def test_the_running_consumer_prunes_at_start(score_store, redis_url):
    delete_person_with_an_item(score_store, "1", "i1")
    age(score_store, [score_store.person_key("1")], 31)
    env = {
        **os.environ,
        "SCORE_REDIS_URL": redis_url,
        "SCORE_KEY_PREFIX": score_store.prefix,
        "AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F",  # no broker: the pruning goes on
        "TOMBSTONE_RETENTION_DAYS": "30",
    }
    process = subprocess.Popen([sys.executable, "-m", "score.consumer"], env=env)
    try:
        wait_until(
            lambda: score_store.person_key("1") not in held(score_store), timeout=30, what="pruned"
        )
        assert score_store.item_key("i1") in held(score_store)  # not due yet
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)


def test_the_store_over_a_unix_socket_applies_as_over_tcp(history):
    """SCORE_REDIS_URL=unix:///…/redis.sock (docs/configuration.md): the same scores through
    the consumer the process builds, its scripts run over the socket."""
    import redis
    from own_servers import own_redis_socket
    from score.store import ScoreStore

    with own_redis_socket() as url:
        client = redis.Redis.from_url(url)
        try:
            assert client.connection_pool.connection_kwargs["path"].endswith("redis.sock")
            store = ScoreStore(client, prefix="socket:")
            bus = bus_into(store)
            for envelope in history.generate(300):
                bus.publish(envelope)
            bus.run_until_idle(max_batch=50)
            assert scores(store, history.cpfs) == history.expected()
        finally:
            client.close()


def test_the_digests_in_parts_are_summed_to_the_digests(score_store):
    """A verification walks the model a SCAN page at a time between the consumer's batches."""
    people = [event("person", str(n), 1, {"cpf": str(n)}) for n in range(2500)]
    apply(score_store, [*people, item("income", "i1", "7", "10.00")])
    pages = list(score_store.digest_pages({"person", "income"}))
    assert len(pages) > 1  # more keys than one page holds
    summed: digests.Digests = {}
    for page in pages:
        digests.merge(summed, page)
    assert summed == score_store.digests({"person", "income"})
    assert summed == digests.of_versions(
        [("person", str(n), 1) for n in range(2500)] + [("income", "i1", 1)]
    )
