"""Verification (messaging.verification): a read model that lost part of its store finds it by
comparing digests with the producer's, through the broker, and repairs only what differs;
`messaging verify` shows it."""

from __future__ import annotations

import json
import threading
from collections.abc import Collection

import pika
import psycopg
import pytest
from messaging import Consumer, ConsumerSettings, Envelope, Outbox, Relay, RelaySettings, digests
from messaging.cli import main
from messaging.errors import PermanentError
from messaging.replay import BUCKETS, DIGESTS, parse_request
from messaging.replay_server import ReplayServer
from messaging.testing import running, wait_until
from messaging.verification import Verification, repairs_at
from replay_requests import take_requests

pytestmark = pytest.mark.integration


class Versions:
    """A read model of entity versions in memory that verifies itself (a VerifiedStore)."""

    def __init__(self, refuse: Collection[str] = ()) -> None:
        self.held: dict[tuple[str, str], int] = {}
        self.streaks: dict = {}
        self.refuse = set(refuse)
        self.lock = threading.Lock()
        self.applied = 0

    def handle(self, envelope: Envelope) -> None:
        if envelope.entity_id in self.refuse:
            raise PermanentError(f"{envelope.entity_id} is refused here")
        key = (envelope.entity, envelope.entity_id)
        with self.lock:
            if self.held.get(key, 0) < envelope.entity_version:
                self.held[key] = envelope.entity_version
            self.applied += 1

    def digests(self, entities: Collection[str]) -> digests.Digests:
        with self.lock:
            return digests.of_versions(
                (entity, entity_id, version)
                for (entity, entity_id), version in self.held.items()
                if entity in entities
            )

    def held_versions(self, entity: str, buckets: list[int]) -> dict[str, int]:
        with self.lock:
            return {
                entity_id: version
                for (kind, entity_id), version in self.held.items()
                if kind == entity and digests.bucket(kind, entity_id) in buckets
            }

    def last_divergence(self) -> dict:
        return self.streaks

    def record_divergence(self, streaks: dict) -> None:
        self.streaks = streaks

    def lose(self, *entity_ids: str) -> None:
        with self.lock:
            for entity_id in entity_ids:
                del self.held[("thing", entity_id)]


def write(db: str, *entity_ids: str) -> None:
    outbox = Outbox("test")
    with psycopg.connect(db) as conn, conn.transaction(), conn.cursor() as cur:
        for entity_id in entity_ids:
            outbox.add(cur, event_type="thing.updated", entity_id=entity_id, data={})


def published(db: str) -> dict[tuple[str, str], int]:
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT entity, entity_id, max(entity_version) FROM messaging_outbox "
            "WHERE published_at IS NOT NULL GROUP BY 1, 2"
        ).fetchall()
    return {(entity, entity_id): version for entity, entity_id, version in rows}


class Pipeline:
    """Outbox -> relay -> broker -> a consumer of `model`, which verifies itself every
    `every` seconds against the producer's replay server."""

    def __init__(self, db: str, broker, model: Versions, every: float) -> None:
        self.db, self.broker, self.model = db, broker, model
        topology = broker.topology("verified")
        self.queue = topology.queue
        self.verification = Verification(
            model, broker.amqp_url, broker.exchange, topology.queue, ["thing"], every=every
        )
        settings = ConsumerSettings(broker.amqp_url, topology, heal_every=0.1)
        self.consumer = Consumer(settings, model.handle, verification=self.verification)
        self.relay = Relay(
            RelaySettings(
                database_url=db,
                amqp_url=broker.amqp_url,
                exchange=broker.exchange,
                poll_interval=0.2,
            )
        )
        self.server = ReplayServer(
            db, broker.amqp_url, broker.exchange, [topology.queue], min_interval=0.0
        )

    def __enter__(self) -> Pipeline:
        conn = pika.BlockingConnection(pika.URLParameters(self.broker.amqp_url))
        self.consumer.topology.declare(conn)  # before the relay publishes
        conn.close()
        self._running = [running(self.consumer), running(self.relay), running(self.server)]
        for component in self._running:
            component.__enter__()
        wait_until(self.consumer.attached.is_set, what="the consumer attached")
        return self

    def __exit__(self, *exc: object) -> None:
        for component in reversed(self._running):
            component.__exit__(*exc)

    def converged(self) -> bool:
        return self.model.held == published(self.db) and bool(self.model.held)


def test_a_model_that_lost_entities_gets_them_back_and_nothing_else_is_replayed(
    producer_db, broker
):
    model = Versions()
    ids = [f"t{n}" for n in range(200)]
    write(producer_db, *ids)
    write(producer_db, *ids[:50])  # some at version 2
    with Pipeline(producer_db, broker, model, every=0.3) as pipeline:
        wait_until(pipeline.converged, timeout=30, what="the model caught up")
        checks = pipeline.verification.stats.checks
        wait_until(lambda: pipeline.verification.stats.checks >= checks + 2, what="two checks")
        assert pipeline.verification.stats.repairs == 0  # nothing differs: nothing repaired
        applied = model.applied

        lost = ["t3", "t7", "t120"]
        model.lose(*lost)
        with model.lock:
            model.held[("thing", "t9")] = 1  # an older version: a failover to a lagging replica
        wait_until(pipeline.converged, timeout=30, what="the lost entities back")

    stats = pipeline.verification.stats
    assert stats.repairs >= 1
    buckets = {digests.bucket("thing", i) for i in [*lost, "t9"]}
    in_them = [i for i in ids if digests.bucket("thing", i) in buckets]
    # only the differing buckets' latest events were replayed (once per repair at most)
    assert len(in_them) <= model.applied - applied <= len(in_them) * stats.repairs
    assert pipeline.consumer.stats.dead_lettered == 0


def test_messaging_verify_prints_what_differs_then_that_nothing_does(
    producer_db, broker, monkeypatch, capsys
):
    model = Versions()
    write(producer_db, "a", "b", "c", "d")
    write(producer_db, "b")
    monkeypatch.setenv("AMQP_URL", broker.amqp_url)
    monkeypatch.setenv("EVENTS_EXCHANGE", broker.exchange)
    monkeypatch.setenv("DATABASE_URL", producer_db)
    # checks only when asked (the first scheduled one, at start, aside)
    with Pipeline(producer_db, broker, model, every=3600) as pipeline:
        wait_until(pipeline.converged, timeout=30, what="the model caught up")
        assert main(["verify", pipeline.queue, "--timeout", "30"]) == 0
        assert "matches the producer" in capsys.readouterr().out

        model.lose("b", "d")
        assert main(["verify", pipeline.queue, "--timeout", "30"]) == 1
        out = capsys.readouterr().out
        assert "b: published v2, held -" in out and "d: published v1, held -" in out
        listed = {line.split(":")[0].strip() for line in out.splitlines() if "held" in line}
        assert listed == {"b", "d"}  # only what differs
        for entity_id in ("b", "d"):
            assert str(digests.bucket("thing", entity_id)) in out
        assert not pipeline.converged()  # one check: not repaired yet

        assert main(["verify", pipeline.queue, "--timeout", "30"]) == 1  # the second repairs
        capsys.readouterr()
        wait_until(pipeline.converged, timeout=30, what="the repair")
        assert main(["verify", pipeline.queue, "--timeout", "30"]) == 0
        assert "matches the producer" in capsys.readouterr().out


def test_messaging_verify_says_so_when_no_consumer_answers(broker, monkeypatch, capsys):
    topology = broker.topology("unattended")
    conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    topology.declare(conn)
    conn.close()
    monkeypatch.setenv("AMQP_URL", broker.amqp_url)
    monkeypatch.setenv("EVENTS_EXCHANGE", broker.exchange)
    assert main(["verify", topology.queue, "--timeout", "0.5"]) == 2
    assert "no report" in capsys.readouterr().err
    assert main(["verify", "no-such-queue", "--timeout", "0.5"]) == 2


def test_a_bucket_a_repair_does_not_mend_is_repaired_ever_more_rarely_and_reported(broker):
    """A model that refuses an entity's events (they are dead-lettered) differs after every
    repair: repairs at the 2nd, 4th, 8th... check, so the dead queue does not fill with copies,
    and the metric of unrepaired buckets says so."""
    model = Versions()
    verification = Verification(model, broker.amqp_url, broker.exchange, "model.q", ["thing"])
    producer = digests.answer(digests.of_versions([("thing", "x", 3)]), ["r"], [])
    asked_at = []
    for check in range(1, 17):
        verification.received(producer)
        if verification.stats.repairs > len(asked_at):
            asked_at.append(check)
    assert asked_at == [2, 4, 8, 16]
    assert [n for n in range(1, 200) if repairs_at(n)][:8] == [2, 4, 8, 16, 32, 64, 128, 192]
    assert verification.stats.unrepaired_buckets == 1
    requests = [
        parse_request(json.dumps(r).encode())
        for r in take_requests(broker.amqp_url, broker.exchange)
    ]
    assert [(r.scope, r.buckets) for r in requests] == [
        (BUCKETS, (("thing", (digests.bucket("thing", "x"),)),))
    ] * 4

    model.held[("thing", "x")] = 3  # mended: the streak ends
    verification.received(producer)
    assert verification.stats.divergent_buckets == verification.stats.unrepaired_buckets == 0
    assert model.streaks == {}


def test_digests_from_the_producer_that_are_not_digests_are_dead_lettered(broker):
    """A digests message that does not decode (hand-made, or a producer of another version) is
    the message's fault: dead with its reason, and the queue flows."""
    model = Versions()
    topology = broker.topology("garbled")
    verification = Verification(
        model, broker.amqp_url, broker.exchange, topology.queue, ["thing"], every=3600
    )
    consumer = Consumer(
        ConsumerSettings(broker.amqp_url, topology), model.handle, verification=verification
    )
    conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    topology.declare(conn)
    channel = conn.channel()
    for body in (b"not json", b"[]", b'{"digests": {"thing": [[99999, 1, 1]]}}'):
        channel.basic_publish(
            "", topology.queue, body, pika.BasicProperties(type="messaging.digests")
        )
    conn.close()
    with running(consumer):
        wait_until(lambda: consumer.stats.dead_lettered == 3, what="three dead")
    assert broker.depth(topology.dead_queue) == 3
    assert verification.stats.checks == 0 and model.streaks == {}


def test_a_request_for_digests_must_name_a_broker_named_reply_queue():
    for reply_to in ("score.entity-changes", "", 5):
        body = {"queue": "q", "request_id": "r", "scope": DIGESTS, "reply_to": reply_to}
        with pytest.raises(ValueError, match="reply_to"):
            parse_request(json.dumps(body).encode())
    body = {"queue": "q", "request_id": "r", "scope": DIGESTS, "reply_to": "amq.gen-x1"}
    assert parse_request(json.dumps(body).encode()).reply_to == "amq.gen-x1"


# -- a check that walks the model in parts, between the consumer's batches ----------------------
class PagedVersions(Versions):
    """The same model, whose digests are summed one entity at a time (`digest_pages`), each
    page from what it holds when the page is taken, as a SCAN sees a store that changes."""

    def digest_pages(self, entities: Collection[str]):
        with self.lock:
            keys = sorted(key for key in self.held if key[0] in entities)
        for key in keys:
            with self.lock:
                version = self.held.get(key)
            yield digests.of_versions([(*key, version)] if version is not None else [])


def distinct_buckets(count: int) -> list[str]:
    """Entity ids of `count` different buckets."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < count:
        found.setdefault(digests.bucket("thing", f"e{n}"), f"e{n}")
        n += 1
    return list(found.values())


def thing(entity_id: str, version: int) -> Envelope:
    return Envelope.new(
        event_type="thing.updated",
        entity_id=entity_id,
        entity_version=version,
        data={},
        producer="test",
    )


def one_lost(broker) -> tuple[PagedVersions, Verification, bytes, str]:
    """A paged model that lost one of the producer's two entities (in two buckets), its
    verification, the producer's digests, and the lost entity's id."""
    model = PagedVersions()
    kept, lost = distinct_buckets(2)
    model.handle(thing(kept, 1))
    producer = digests.answer(
        digests.of_versions([("thing", kept, 1), ("thing", lost, 1)]), ["r"], []
    )
    verification = Verification(model, broker.amqp_url, broker.exchange, "model.q", ["thing"])
    return model, verification, producer, lost


def walk(verification: Verification) -> None:
    """Sum the rest of the check under way, and compare."""
    while verification.step():
        pass


def test_a_check_in_parts_leaves_out_the_buckets_events_touched_and_finds_the_rest(broker):
    model = PagedVersions()
    first, lost, changed = distinct_buckets(3)
    for entity_id in (first, lost, changed):
        model.handle(thing(entity_id, 1))
    producer = digests.answer(model.digests(["thing"]), ["r"], [])
    verification = Verification(model, broker.amqp_url, broker.exchange, "model.q", ["thing"])
    verification.received(producer)
    assert verification.checking and verification.stats.checks == 0  # nothing summed yet
    assert verification.step(budget=0)  # one part summed
    model.lose(lost)  # a key deleted by hand: what verification is for
    model.handle(thing(changed, 2))  # an event behind the digests, applied meanwhile
    verification.touch([thing(changed, 2)])
    walk(verification)
    assert not verification.checking and verification.stats.checks == 1
    assert verification.stats.skipped_buckets == 1
    assert verification.stats.divergent_buckets == 1  # the lost entity's; not the changed one's
    assert model.streaks == {"thing": {str(digests.bucket("thing", lost)): 1}}


def test_a_bucket_left_out_of_a_check_keeps_its_count_of_checks_in_a_row(broker):
    model, verification, producer, lost = one_lost(broker)
    where = str(digests.bucket("thing", lost))

    def check(touched: list[Envelope]) -> None:
        verification.received(producer, touched)
        walk(verification)

    check([])
    assert model.streaks == {"thing": {where: 1}}
    check([thing(lost, 1)])  # an event of its bucket came behind the digests: not compared
    assert model.streaks == {"thing": {where: 1}} and verification.stats.repairs == 0
    check([])  # differs a second time it was looked at: repaired
    assert model.streaks == {"thing": {where: 2}} and verification.stats.repairs == 1
    [request] = take_requests(broker.amqp_url, broker.exchange)
    assert request["buckets"] == {"thing": [int(where)]}
    check([])  # the repair did not mend it (nothing answers here): unrepaired
    assert verification.stats.unrepaired_buckets == 1
    check([thing(lost, 1)])  # left out of a check, it is still unrepaired (the alert holds)
    assert verification.stats.unrepaired_buckets == 1 and model.streaks == {"thing": {where: 3}}


def test_digests_that_come_during_a_check_wait_for_the_next_and_an_operators_is_whole(broker):
    model, verification, producer, _ = one_lost(broker)
    verification.received(producer)
    verification.received(producer)  # a check is under way: it goes on
    assert verification.stats.superseded == 1 and verification.checking
    walk(verification)
    assert verification.stats.checks == 1 and verification.stats.divergent_buckets == 1
    # An operator's request (messaging verify) is answered from a whole walk, at once.
    held = model.digests(["thing"])  # what the model holds: an operator's check finds it equal
    asking = digests.answer(held, ["r"], ["amq.gen-x"])
    verification.received(asking)
    assert not verification.checking and verification.stats.checks == 2
    assert verification.stats.divergent_buckets == 0


class Failing(Versions):
    def digests(self, entities: Collection[str]) -> digests.Digests:
        from messaging.errors import StoreUnavailable

        raise StoreUnavailable("the store is away")


@pytest.mark.unit
def test_a_store_that_fails_to_sum_leaves_no_check_behind():
    from messaging.errors import StoreUnavailable

    model = Failing()
    verification = Verification(model, "amqp://unused/%2F", "x", "model.q", ["thing"])
    producer = digests.answer(digests.of_versions([("thing", "a", 1)]), ["r"], [])
    with pytest.raises(StoreUnavailable):
        verification.received(producer)
    assert not verification.checking  # nothing left to finish later with an empty model
    assert verification.stats.checks == 0 and model.streaks == {}


@pytest.mark.unit
def test_events_behind_the_digests_in_their_own_batch_are_left_out_of_the_check():
    from types import SimpleNamespace

    from messaging.handlers import Handlers
    from messaging.processing import Processor
    from messaging.replay import DIGESTS_TYPE
    from messaging.topology import Topology

    model = Versions()
    behind = distinct_buckets(1)[0]
    model.handle(thing(behind, 1))
    producer = digests.answer(model.digests(["thing"]), ["r"], [])
    verification = Verification(model, "amqp://unused/%2F", "x", "model.q", ["thing"])
    processor = Processor(
        Topology("svc", "x", (0.2,)), Handlers.every(model.handle), verification=verification
    )

    def delivery(body: bytes, kind: str | None = None) -> SimpleNamespace:
        properties = SimpleNamespace(type=kind, headers={}, message_id="m", correlation_id=None)
        return SimpleNamespace(redelivered=False, properties=properties, body=body)

    batch = [delivery(producer, DIGESTS_TYPE), delivery(thing(behind, 2).to_json())]
    outcomes = processor.process(batch)
    assert [o.decision for o in outcomes] == [None, None]
    assert model.held[("thing", behind)] == 2  # applied before the digests were compared
    assert verification.stats.checks == 1
    assert verification.stats.divergent_buckets == 0 and verification.stats.skipped_buckets == 1


@pytest.mark.unit
def test_a_check_under_way_is_abandoned_when_the_model_starts_healing():
    from types import SimpleNamespace

    from messaging.handlers import Handlers
    from messaging.processing import Processor
    from messaging.topology import Topology

    model = PagedVersions()
    for entity_id in distinct_buckets(3):
        model.handle(thing(entity_id, 1))
    verification = Verification(model, "amqp://unused/%2F", "x", "model.q", ["thing"])
    healing = SimpleNamespace(state="ready")
    processor = Processor(
        Topology("svc", "x", (0.2,)),
        Handlers.every(model.handle),
        healing=healing,
        verification=verification,
    )
    verification.received(digests.answer(model.digests(["thing"]), ["r"], []))
    assert processor.verifying
    healing.state = "rebuilding"  # the store lost its data: its walk would find it all missing
    assert not processor.verify_step()
    assert not processor.verifying and verification.stats.abandoned == 1
    assert verification.stats.checks == 0 and model.streaks == {}
