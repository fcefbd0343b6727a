"""Generated histories against each read model (hypothesis stateful testing).

The producer is the person service's own rules (the in-memory store); its events go through
the in-memory bus, which runs the consumer runtime's decisions, into the real handler and the
real store (Redis for the score, PostgreSQL for the notifier). Between the producer's changes
the bus delivers some of what is in flight, in any order, duplicated, redelivered or replayed;
the score's store is wiped (wholly or in part, as a wipe under live traffic leaves it) and
rebuilt from a replay; poison and hostile-header messages are mixed in. After each history,
once everything in flight has been delivered, the read model must equal what the producer's
final state implies, the poison must be dead and nothing else.

The score's test runs twice: on the run's Redis, and on a Redis Cluster of its own (marked
`cluster`). Part of either store is lost too (keys or rows deleted behind the model's back,
with no replay): verification (messaging.verification, answered by the test kit's
MemoryProducer) must find and repair it, and the digests of both sides must agree once the
history is over. The tombstones' retention runs at its shortest (every tombstone pruned at
once): no digest moves, and what a late older event brings back after it, verification mends.

`make test` runs a bounded number of examples (HYPOTHESIS_PROFILE=suite); `make soak` runs the
long profile.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import uuid
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from messaging import Consumer, Envelope, digests
from messaging.stores import redis_client
from messaging.testing import InMemoryBus, MemoryProducer, Message
from notifier import retention
from notifier.config import NotifierConfig
from notifier.consumer import build as build_notifier
from notifier.store import NotifierStore
from person.errors import Conflict, Unprocessable
from person.memory import MemoryStore
from psycopg_pool import ConnectionPool
from score.config import ScoreConfig
from score.consumer import build as build_score
from score.scoring import score
from score.store import ScoreStore
from servicekit.retention import Pruner

pytestmark = pytest.mark.integration

CPFS = st.sampled_from(["101", "102", "103"])  # few, so re-registrations happen
EMAILS = st.sampled_from([None, "a@example.com", "b@example.com", "c@example.com"])
VALUES = st.one_of(
    st.sampled_from([Decimal("0"), Decimal("0.01"), Decimal("999999999999999.99")]),
    st.decimals(min_value=0, max_value=10**6, places=2, allow_nan=False, allow_infinity=False),
)
POISON = st.one_of(
    st.binary(max_size=64).map(lambda body: (body, {})),
    st.sampled_from(
        [
            (b"{}", {"x-death": 5}),
            (b"not json", {"x-death": [{"count": "3", "queue": "q"}]}),
            (b'{"event_type": "person.created"}', {"x-attempts": "many"}),
            (b"[]", {"x-death": ["junk"], "x-first-failure-at": 7}),
        ]
    ),
)


class History(RuleBasedStateMachine):
    """The producer's changes and the broker's deliveries; subclasses bring the read model."""

    def __init__(self) -> None:
        super().__init__()
        ids = itertools.count(1)
        self.producer = MemoryStore(new_id=lambda: uuid.UUID(int=next(ids)))
        self.bus = InMemoryBus()  # only the broker: the consumer is the process's own
        self.consumer = self.bus.attach(self.build_consumer())
        self.queue = self.consumer.topology.queue
        self.published = 0  # producer events handed to the bus so far
        self.poisoned = 0
        self.rng = random.Random(0)
        self.lost = False  # part of the store was lost during the history
        self.verification = self.consumer.verification
        assert self.verification is not None, "the process verifies its model"
        self.answers = MemoryProducer(
            self.bus, self.queue, lambda: self.producer.events[: self.published]
        )
        self.verification.request = self.answers  # the producer's side of it

    # -- the read model (subclasses) -----------------------------------------------------------
    def build_consumer(self) -> Consumer:
        """The consumer, built by its process's composition root over the test's store."""
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError

    def lose(self, choose: Callable[[list], list]) -> bool:
        """Delete the entities `choose` picks from the model's store behind its back (nothing
        is replayed); whether anything was deleted."""
        raise NotImplementedError

    def prune(self) -> bool:
        """Prune every tombstone the retention would (as if each were past it); whether any
        was pruned."""
        raise NotImplementedError

    @rule()
    def prune_tombstones(self) -> None:
        """The tombstones' retention: the digests stay as they were (a tombstone counts nothing
        on either side), but a late older event may now bring an entity back, which only
        verification mends (it counts as a loss)."""
        entities = self.verification.entities
        before = self.verification.store.digests(entities)
        self.lost |= self.prune()
        assert self.verification.store.digests(entities) == before

    @rule(data=st.data())
    def lose_part(self, data: st.DataObject) -> None:
        """What a restore from an older snapshot, a failover to a lagging replica or a hand
        leave behind: entities missing from the store, and no one told."""
        # Drawn whatever the store holds (positions, not its entities), so that the draws of a
        # history never depend on its state: hypothesis replays it draw for draw.
        picks = data.draw(st.lists(st.integers(0, 63), unique=True, max_size=8), label="lost")
        self.lost |= self.lose(
            lambda found: sorted({found[i % len(found)] for i in picks}) if found else []
        )

    @rule()
    def verify(self) -> None:
        """A scheduled verification: the producer's digests join the queue behind what is in
        flight, and are compared when delivered."""
        self.verification.ask()

    # -- the producer ------------------------------------------------------------------------
    def _someone(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.producer.people)), label="cpf")

    @rule(cpf=CPFS, email=EMAILS)
    def register(self, cpf: str, email: str | None) -> None:
        fields = {
            "cpf": cpf,
            "name": f"N{cpf}",
            "address": "a",
            "date_of_birth": date(1990, 1, 1),
            "email": email,
        }
        with contextlib.suppress(Conflict):
            self.producer.create_person(fields, "register")

    @precondition(lambda self: self.producer.people)
    @rule(data=st.data(), email=EMAILS, rename=st.booleans())
    def update(self, data: st.DataObject, email: str | None, rename: bool) -> None:
        changes: dict[str, Any] = {"email": email}
        if rename:
            changes["name"] = f"R{uuid.uuid4().hex[:4]}"
        self.producer.update_person(self._someone(data), changes, "update")

    @precondition(lambda self: self.producer.people)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        self.producer.delete_person(self._someone(data), "delete")

    @precondition(lambda self: self.producer.people)
    @rule(data=st.data(), kind=st.sampled_from(["income", "asset", "debt"]), value=VALUES)
    def add_item(self, data: st.DataObject, kind: str, value: Decimal) -> None:
        self.producer.add_item(self._someone(data), kind, "t", value, "item")

    @precondition(lambda self: self.producer.items)
    @rule(data=st.data())
    def delete_item(self, data: st.DataObject) -> None:
        item_id = data.draw(st.sampled_from(sorted(self.producer.items)), label="item")
        item = self.producer.items[item_id]
        self.producer.delete_item(item["cpf"], item["kind"], item_id, "unitem")

    @precondition(lambda self: self.producer.people)
    @rule(data=st.data())
    def request_activation(self, data: st.DataObject) -> None:
        with contextlib.suppress(Conflict, Unprocessable):
            self.producer.request_activation(self._someone(data), "again")

    @precondition(lambda self: self.producer.people)
    @rule(data=st.data())
    def activate(self, data: st.DataObject) -> None:
        person = self.producer.people[self._someone(data)]
        if person["email"]:
            self.producer.activate(person["cpf"], person["email"], person["created_at"], "activate")

    # -- the broker --------------------------------------------------------------------------
    @rule(data=st.data())
    def deliver_some(self, data: st.DataObject) -> None:
        """Publish what the producer committed (some of it twice), then deliver a random part
        of the queue in a random order, in batches."""
        new = self.producer.events[self.published :]
        self.published = len(self.producer.events)
        for envelope in new:
            self.bus.publish(envelope)
            if data.draw(st.booleans(), label="duplicate"):
                self.bus.publish(envelope)
        self._deliver(data.draw(st.integers(0, 2**32), label="order"), partial=True)

    @precondition(lambda self: self.published > 0)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        sent = self.producer.events[: self.published]
        picks = data.draw(st.lists(st.sampled_from(sent), max_size=5), label="redelivered")
        for envelope in picks:
            self.bus.publish(envelope)

    @rule()
    def replay(self) -> None:
        """The latest event of every entity, as `messaging replay` or a heal sends them."""
        self.lost = False  # what is lost by now comes back from this: not verification's doing
        for envelope in self._latest():
            self.bus.publish(envelope)

    @rule(poison=POISON)
    def publish_poison(self, poison: tuple[bytes, dict]) -> None:
        body, headers = poison
        self.bus.publish(Message(body, f"poison-{self.poisoned}", headers=dict(headers)))
        self.poisoned += 1

    def _latest(self) -> list[Envelope]:
        latest: dict[tuple[str, str], Envelope] = {}
        for envelope in self.producer.events[: self.published]:
            latest[(envelope.entity, envelope.entity_id)] = envelope
        return list(latest.values())

    def _deliver(self, seed: int, partial: bool) -> None:
        rng = random.Random(seed)
        ready = self.bus.ready(self.queue)  # the broker reorders (redeliveries, retries)
        waiting = list(ready)
        rng.shuffle(waiting)
        ready.clear()
        ready.extend(waiting)
        if partial:
            keep = rng.randint(0, len(waiting))
            held = [ready.pop() for _ in range(keep)]
            self.bus.deliver(max_batch=rng.choice((1, 3, 50)))
            ready.extend(held)
        else:
            self.bus.run_until_idle(max_batch=rng.choice((1, 3, 50)))

    def teardown(self) -> None:
        try:
            for envelope in self.producer.events[self.published :]:
                self.bus.publish(envelope)
            self.published = len(self.producer.events)
            self._deliver(self.rng.randrange(2**32), partial=False)
            # and once all is delivered, a random part lost (what was lost during the history
            # may have come back with a late or repeated event)
            self.lost |= self.lose(
                lambda found: self.rng.sample(found, self.rng.randint(0, len(found)))
            )
            self._verified()
            self.check()
            dead = self.bus.dead_letters(self.queue)
            assert sorted(m.message_id for m in dead) == sorted(
                f"poison-{n}" for n in range(self.poisoned)
            ), [m.headers.get("x-dead-reason") for m in dead]
            assert all(m.headers.get("x-dead-reason") for m in dead)
        finally:
            self.clean()

    def _verified(self) -> None:
        """Verify until the model's digests are the producer's: at once if nothing was lost
        (both sides keep the same digests), else after the repairs verification asks for."""
        entities = self.verification.entities
        checks = 0
        while differ := digests.differing(
            self._producer_digests(entities), self.verification.store.digests(entities), entities
        ):
            assert self.lost, ("digests differ though nothing was lost", differ)
            # a bucket is repaired by its second check in a row, at the latest by the 64th
            assert checks < 130, "verification did not repair the model"
            self.verification.ask()
            self.bus.run_until_idle(max_batch=50)
            checks += 1
        assert not self.lost or checks == 0 or self.verification.stats.repairs > 0

    def _producer_digests(self, entities: list[str]) -> dict:
        found = digests.of_versions(  # a deleted entity counts nothing
            (e.entity, e.entity_id, e.entity_version)
            for e in self.answers.latest()
            if e.change != "deleted"
        )
        return {entity: buckets for entity, buckets in found.items() if entity in entities}

    def clean(self) -> None:
        pass


# The profile of the root conftest: "suite" in make test (bounded, derandomized), "soak" in
# make soak.
history_settings = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


# -- the score read model -----------------------------------------------------------------------
SCORE: dict[str, Any] = {}


class ScoreHistory(History):
    def __init__(self) -> None:
        self.store = ScoreStore(SCORE["client"], f"{SCORE['prefix']}{uuid.uuid4().hex[:8]}:")
        super().__init__()

    def build_consumer(self) -> Consumer:
        config = ScoreConfig(events_exchange="histories", retry_delays=(1.0, 5.0))
        return build_score(config, self.store)[0]

    @rule(data=st.data())
    def wipe_and_rebuild(self, data: st.DataObject) -> None:
        """A wipe, whole or as one that live traffic interleaved with (some keys left), then
        the replay the healing consumer asks for."""
        keys = sorted(self.store.client.scan_iter(match=f"{self.store.prefix}*", count=1000))
        doomed = (
            data.draw(st.lists(st.sampled_from(keys), unique=True), label="wiped")
            if (keys and data.draw(st.booleans(), label="partial"))
            else keys
        )
        if doomed:
            self.store.unlink(doomed)
        self.replay()

    def lose(self, choose: Callable[[list], list]) -> bool:
        prefix = self.store.prefix
        patterns = [f"{prefix}person:*", f"{prefix}item:*"]
        if self.store.cluster:
            # A person's item set is on another master than its items, which fail over apart:
            # there verification finds a set that lost an item too (store.py).
            patterns.append(f"{prefix}items:*")
        keys = sorted(
            key
            for pattern in patterns
            for key in self.store.client.scan_iter(match=pattern, count=1000)
        )
        doomed = choose(keys)
        if doomed:
            self.store.unlink(doomed)
        return bool(doomed)

    def prune(self) -> bool:
        return bool(self.store.prune_tombstones(0, self.store.due_tombstones(0, [], 10_000)))

    def check(self) -> None:
        for cpf in ("101", "102", "103"):
            found = self.store.read(cpf)
            if cpf not in self.producer.people:
                assert found is None, cpf
                continue
            items = [i for i in self.producer.items.values() if i["cpf"] == cpf]
            assert found is not None, cpf
            assert found.score == score((i["kind"], i["value"]) for i in items), cpf
            for kind, total in (("income", found.incomes), ("asset", found.assets)):
                assert total == sum((i["value"] for i in items if i["kind"] == kind), Decimal(0))

    def clean(self) -> None:
        self.store.unlink(list(self.store.client.scan_iter(match=f"{self.store.prefix}*")))


# The wipes SCAN for the history's keys: in a logical database of their own, so a SCAN walks
# only this test's keys however many the rest of the run (or a bench) left in database 0.
HISTORY_DATABASE = 15


@pytest.mark.parametrize(
    "where", ["redis", pytest.param("redis-cluster", marks=pytest.mark.cluster)]
)
def test_score_model_equals_the_producers_state_after_any_history(servers, request, where):
    if where == "redis":
        url = urlunsplit(urlsplit(servers.redis)._replace(path=f"/{HISTORY_DATABASE}"))
    else:  # a cluster has only database 0, and this run's cluster no other keys
        url = request.getfixturevalue("redis_cluster").url
    client = redis_client(url)
    SCORE.update(client=client, prefix=f"history-{uuid.uuid4().hex[:6]}-")
    try:
        run_state_machine_as_test(ScoreHistory, settings=history_settings)
    finally:
        client.close()


# -- the notifier read model --------------------------------------------------------------------
NOTIFIER: dict[str, Any] = {}


class NotifierHistory(History):
    def __init__(self) -> None:
        self.store: NotifierStore = NOTIFIER["store"]
        with self.store.pool.connection() as conn:
            conn.execute("TRUNCATE users, deliveries, mailbox")
        super().__init__()

    def build_consumer(self) -> Consumer:
        config = NOTIFIER["config"].model_copy(
            update={"events_exchange": "histories", "retry_delays": (1.0, 5.0)}
        )
        return build_notifier(config, self.store.pool)[0]

    @invariant()
    def at_most_one_welcome_per_registration(self) -> None:
        with self.store.pool.connection() as conn:
            assert not conn.execute(
                "SELECT cpf, registered_at FROM deliveries WHERE kind = 'welcome' "
                "GROUP BY 1, 2 HAVING count(*) > 1"
            ).fetchall()

    def lose(self, choose: Callable[[list], list]) -> bool:
        with self.store.pool.connection() as conn:
            cpfs = [cpf for (cpf,) in conn.execute("SELECT cpf FROM users ORDER BY cpf")]
            doomed = choose(cpfs)
            conn.execute("DELETE FROM users WHERE cpf = ANY(%s)", (doomed,))
        return bool(doomed)

    def prune(self) -> bool:
        config = NOTIFIER["config"].model_copy(update={"tombstone_retention_days": 1e-9})
        [tombstones] = [rule for rule in retention.rules(config) if rule.name == "tombstones"]
        return bool(Pruner(self.store.pool.connection, [tombstones]).run_once()["tombstones"])

    def check(self) -> None:
        with self.store.pool.connection() as conn:
            deliveries = conn.execute(
                "SELECT kind, cpf, registered_at, event_id::text, to_email, status, version "
                "FROM deliveries"
            ).fetchall()
        events = {str(e.event_id): e for e in self.producer.events}
        current = {(cpf, p["created_at"]): p for cpf, p in self.producer.people.items()}
        for cpf in ("101", "102", "103"):
            user, person = self.store.user(cpf), self.producer.people.get(cpf)
            if person is None:
                assert user is None, cpf
                continue
            assert user is not None, cpf
            assert (user["name"], user["email"], user["status"]) == (
                person["name"],
                person["email"],
                person["status"],
            ), cpf
            welcomes = [
                d
                for d in deliveries
                if d[0] == "welcome" and d[1] == cpf and d[2] == person["created_at"]
            ]
            assert len(welcomes) == (1 if person["email"] else len(welcomes)), (cpf, welcomes)
        for kind, cpf, registered_at, event_id, to_email, status, version in deliveries:
            event = events[event_id]
            assert to_email == event.data["email"], "mail to an address the event did not carry"
            if kind == "activation":
                assert event.event_type == "person.activation_requested"
            person = current.get((cpf, registered_at))
            if person is None or (person["email"] or "").lower() != to_email.lower():
                # a registration deleted since, or an address changed since
                assert status == "cancelled", (kind, cpf, registered_at, to_email, status)
            elif status == "cancelled":  # a version between it and now had another address
                assert any(
                    e.entity_id == cpf and e.entity_version > version and not self._for(e, to_email)
                    for e in self.producer.events
                ), (kind, cpf, to_email)
            else:
                assert status == "pending", (kind, cpf, status)

    @staticmethod
    def _for(event: Envelope, to_email: str) -> bool:
        """Whether the person's state in `event` still calls for mail to this address."""
        return event.data is not None and (event.data["email"] or "").lower() == to_email.lower()


def test_notifier_view_and_ledger_after_any_history(notifier_db, servers):
    config = NotifierConfig(
        notifier_database_url=notifier_db,
        amqp_url=servers.amqp,
        activation_secret="history-secret",
        public_person_url="http://person.test",
    )
    with ConnectionPool(notifier_db, min_size=1, max_size=2) as pool:
        NOTIFIER.update(store=NotifierStore(pool), config=config)
        run_state_machine_as_test(NotifierHistory, settings=history_settings)
