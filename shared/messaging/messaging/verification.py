"""A read model that proves it is right: anti-entropy against the producer's digests.

Every `every` seconds a replica of the model asks the producer, through the broker, for its
digests (digests.py: one sum per entity type and bucket of entities, kept by the relay as it
publishes). They arrive in the model's own queue, behind the events published before them, and
the runtime hands them here: the model computes its digests from what it holds (so a key deleted
by hand, a restored snapshot or a failover to a lagging replica all show) and compares. A bucket
that differs in two checks in a row (not merely events in flight) is repaired: the producer
replays the latest event of that bucket's entities to the model's queue, through its version
gate. Nothing else is replayed.

What a model's store offers (`VerifiedStore`): its digests computed from what it holds, the
versions it holds in some buckets (for an operator's report), and where the last check's
divergence is kept (so replicas that take turns agree on "two in a row").

Computing a model's digests walks all it holds: seconds for a million entities. A check does
not hold the model's events back for that long. A store that computes them in parts
(`digest_pages`) is walked for about STEP_SECONDS at a time between the consumer's batches; the
events applied meanwhile (and those behind the digests in their own batch) change what is being
summed, so their buckets are left out of that check, neither differing nor agreeing: a bucket's
count of checks in a row stands until a check that could compare it. Digests that come while a
check is under way wait for the next one; an operator's (`messaging verify`, with a reply queue)
is answered from a whole walk at once, every bucket compared. A check is abandoned if the store
fails during it or the model starts healing. Only this replica's events are left out: with
several replicas on one store, another's writes during the walk can make a bucket differ once,
which the second check in a row absorbs as before.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pika

from . import digests
from .connection import connect
from .digests import Digests
from .envelope import Envelope
from .replay import BUCKETS, DIGESTS, DIGESTS_TYPE, REPLY_QUEUE_PREFIX, request_replay

if TYPE_CHECKING:
    from .settings import BrokerSettings

log = logging.getLogger("messaging.verification")

REPORT_TYPE = "messaging.verification-report"
STEP_SECONDS = 0.01  # how long a check sums pages between two of the consumer's batches
MAX_HELD_REPORTED = 20_000  # versions a report to `messaging verify` lists at most


class VerifiedStore(Protocol):
    """What a read model's store offers to be verified against its producer.

    Its digests computed from what it holds now, the versions it holds in some buckets (for
    `messaging verify`), and the place where the last check's divergence is kept, so that
    replicas taking turns agree on "two checks in a row".
    """

    def digests(self, entities: Collection[str]) -> Digests:
        """Per entity type and bucket, the digest of the live entities the store holds (computed
        from it; a tombstone counts nothing, as the producer's deleted entities)."""
        ...

    def held_versions(self, entity: str, buckets: list[int]) -> dict[str, int]:
        """entity id -> the version held, for the live entities of these buckets."""
        ...

    # Optional: `digest_pages(entities) -> Iterator[Digests]`, the same digests in parts, each
    # a bounded amount of work, that sum to `digests(entities)` (see the module docstring).

    def last_divergence(self) -> Streaks:
        """What `record_divergence` kept last (empty if nothing differs or it never ran)."""
        ...

    def record_divergence(self, streaks: Streaks) -> None:
        """Keep, for the next check (of whichever replica), the checks in a row each differing
        bucket has differed."""
        ...


# entity type -> bucket (a string: JSON's keys) -> checks in a row it has differed
Streaks = dict[str, dict[str, int]]


def repairs_at(streak: int) -> bool:
    """Whether a bucket that has differed `streak` checks in a row is repaired now: at the
    second (not merely events in flight), then ever more rarely (4th, 8th, ... then every 64th
    check) while a repair does not mend it: a bucket whose events the model refuses (dead
    letters) is not replayed into the dead queue every other minute."""
    return streak >= 2 and (streak & (streak - 1) == 0 or streak % 64 == 0)


@dataclass
class _Check:
    """A check under way: the producer's digests, the model's summed so far, and the buckets
    that events applied since the digests arrived have touched."""

    producer: Digests
    reply_to: list[str]
    pages: Iterator[Digests]
    model: Digests = field(default_factory=dict)
    touched: set[tuple[str, int]] = field(default_factory=set)


@dataclass
class VerificationStats:
    checks: int = 0
    divergent_buckets: int = 0  # what the last check this replica made found
    skipped_buckets: int = 0  # buckets the last check left out: events touched them meanwhile
    abandoned: int = 0  # checks dropped: the store failed during the walk, or the model healed
    superseded: int = 0  # digests that came while a check was still under way (not compared)
    unrepaired_buckets: int = 0  # of those, how many still differed after a repair
    repairs: int = 0  # repair replays this replica asked for
    last_checked_at: float | None = None  # epoch seconds
    last_repaired: dict[str, list[int]] = field(default_factory=dict)


class Verification:
    """Verify a read model against its producer every `every` seconds, and repair what differs.

    A check asks the producer, through the broker, for its digests (one per entity type and
    bucket of entities, kept as the relay publishes) and compares them with the ones `store`
    computes from what it holds. A bucket that differs in two checks in a row is repaired: the
    producer replays the latest event of that bucket's entities to `queue`, through the model's
    version gate. `scheduled()` builds one from `BrokerSettings` (`VERIFY_SECONDS`).
    """

    def __init__(
        self,
        store: VerifiedStore,
        amqp_url: str,
        exchange: str,
        queue: str,
        entities: Collection[str],
        every: float = 60.0,
    ) -> None:
        self.store, self.amqp_url, self.exchange, self.queue = store, amqp_url, exchange, queue
        self.entities = sorted(entities)
        self.every = every
        self.stats = VerificationStats()
        self._asked_at = float("-inf")
        self._check: _Check | None = None
        # How a request reaches the producer: (request_id, scope, buckets=, reply_to=). Through
        # the broker; a test's producer of its own may answer instead.
        self.request: Callable[..., None] = functools.partial(
            request_replay, amqp_url, exchange, queue
        )

    @classmethod
    def scheduled(
        cls, settings: BrokerSettings, store: VerifiedStore, queue: str, entities: Collection[str]
    ) -> Verification | None:
        """The verification a process's settings ask for (every VERIFY_SECONDS), or None when
        VERIFY_SECONDS is 0."""
        if not settings.verify_seconds:
            return None
        return cls(
            store,
            settings.amqp_url,
            settings.events_exchange,
            queue,
            entities,
            every=settings.verify_seconds,
        )

    def due(self) -> bool:
        return time.monotonic() - self._asked_at >= self.every

    def ask(self, reply_to: str | None = None) -> str:
        """Ask the producer for its digests now; returns the request's id."""
        self._asked_at = time.monotonic()
        request_id = f"verify-{uuid.uuid4()}"
        self.request(request_id, DIGESTS, reply_to=reply_to)
        return request_id

    def received(self, body: bytes, touched: Iterable[Envelope] = ()) -> None:
        """The producer's digests arrived (in the model's queue, behind the events published
        before them): start a check. `touched`: events already applied that came behind the
        digests (in the same batch). A store that computes its digests in parts is walked by
        `step()`, between batches; any other is summed and compared now."""
        answer = json.loads(body)
        if not isinstance(answer, dict):
            raise ValueError("the digests message is not an object")
        producer = digests.decode(answer.get("digests"))
        reply_to = [
            q
            for q in answer.get("reply_to") or []
            if isinstance(q, str) and q.startswith(REPLY_QUEUE_PREFIX)  # only broker-named
        ]
        paged = getattr(self.store, "digest_pages", None)
        if paged is None or reply_to:
            # No parts, or an operator waits for the answer (messaging verify): the whole model
            # now, every bucket compared. Summed before anything is kept, so a store that fails
            # here leaves no check behind.
            if self._check is not None:
                self.abandon()  # this one says more, now
            check = _Check(producer, reply_to, iter(()), self.store.digests(self.entities))
            check.touched.update(self._buckets(touched))
            self._finish(check)
            return
        if self._check is not None:
            # A check still under way goes on: replacing it would let no check end while a walk
            # takes longer than the time between two.
            self.stats.superseded += 1
            log.info("%s: a check is still under way; these digests wait for the next", self.queue)
            return
        self._check = _Check(producer, reply_to, paged(self.entities))
        self.touch(touched)

    @property
    def checking(self) -> bool:
        """A check is under way: `step()` has work, and applied events are to be `touch`ed."""
        return self._check is not None

    def touch(self, envelopes: Iterable[Envelope]) -> None:
        """Events applied while a check is under way: their buckets are left out of it."""
        if self._check is not None:
            self._check.touched.update(self._buckets(envelopes))

    def _buckets(self, envelopes: Iterable[Envelope]) -> set[tuple[str, int]]:
        return {
            (envelope.entity, digests.bucket(envelope.entity, envelope.entity_id))
            for envelope in envelopes
            if envelope.entity in self.entities
        }

    def abandon(self) -> None:
        """Drop the check under way (its store failed, or the model is being rebuilt): nothing
        is compared or recorded."""
        if self._check is not None:
            self._check = None
            self.stats.abandoned += 1

    def step(self, budget: float = STEP_SECONDS) -> bool:
        """Sum more parts of the model's digests, for about `budget` seconds; compare once all
        are summed. True while the check has more to do."""
        check = self._check
        if check is None:
            return False
        until = time.monotonic() + budget
        while True:
            page = next(check.pages, None)
            if page is None:
                self._finish(check)
                return False
            digests.merge(check.model, page)
            if time.monotonic() >= until:
                return True

    def _finish(self, check: _Check) -> None:
        self._check = None
        divergent = digests.differing(check.producer, check.model, self.entities)
        skipped = {entity: {b for e, b in check.touched if e == entity} for entity in self.entities}
        divergent = {
            entity: kept
            for entity, buckets in divergent.items()
            if (kept := [b for b in buckets if b not in skipped[entity]])
        }
        before = _streaks(self.store.last_divergence())
        streaks = {
            entity: {str(b): before.get(entity, {}).get(str(b), 0) + 1 for b in buckets}
            for entity, buckets in divergent.items()
        }
        for entity, buckets in skipped.items():  # not compared: their count stands
            for b in buckets:
                streak = before.get(entity, {}).get(str(b))
                if streak:
                    streaks.setdefault(entity, {})[str(b)] = streak
        self.store.record_divergence(streaks)
        due = {
            entity: sorted(
                int(b)
                for b, streak in found.items()
                if repairs_at(streak) and int(b) in divergent.get(entity, ())
            )
            for entity, found in streaks.items()
        }
        due = {entity: buckets for entity, buckets in due.items() if buckets}
        self.stats.checks += 1
        self.stats.divergent_buckets = sum(len(b) for b in divergent.values())
        self.stats.skipped_buckets = len(check.touched)
        # Left-out buckets too: a bucket a repair did not mend stays unrepaired until a check
        # finds it equal (the alert on it must not flap with the checks that skip it).
        self.stats.unrepaired_buckets = sum(
            streak > 2 for found in streaks.values() for streak in found.values()
        )
        self.stats.last_checked_at = time.time()
        if due:
            self._repair(due)
        elif divergent:
            log.info("%s: %d bucket(s) differ; looking again before repairing", self.queue,
                     self.stats.divergent_buckets)  # fmt: skip
        for queue in check.reply_to:
            self._report(queue, divergent)

    def _repair(self, buckets: dict[str, list[int]]) -> None:
        count = sum(len(b) for b in buckets.values())
        log.warning(
            "%s: %d bucket(s) differ from the producer twice in a row: replaying them (%s)",
            self.queue,
            count,
            ", ".join(f"{entity}: {len(b)}" for entity, b in buckets.items()),
        )
        self.request(f"repair-{uuid.uuid4()}", BUCKETS, buckets=buckets)
        self.stats.repairs += 1
        self.stats.last_repaired = buckets

    def _report(self, queue: str, divergent: dict[str, list[int]]) -> None:
        """What differs, from the model's side, to an operator's reply queue (messaging verify):
        the differing buckets and the versions held in them (at most MAX_HELD_REPORTED)."""
        held: dict[str, dict[str, int]] = {}
        room = MAX_HELD_REPORTED
        for entity, buckets in divergent.items():
            versions = sorted(self.store.held_versions(entity, buckets).items())
            held[entity] = dict(versions[: max(room, 0)])
            room -= len(versions)
        body = {"queue": self.queue, "divergent": divergent, "held": held, "complete": room >= 0}
        try:
            conn = connect(self.amqp_url, "verification-report")
            try:
                conn.channel().basic_publish(
                    "",
                    queue,
                    json.dumps(body).encode(),
                    pika.BasicProperties(type=REPORT_TYPE, content_type="application/json"),
                )
            finally:
                if conn.is_open:
                    conn.close()
        except Exception as exc:  # the operator's command waits in vain; the check stands
            log.warning("could not send the verification report to %s: %s", queue, exc)

    def snapshot(self) -> dict[str, Any]:
        """What a replica reports (its beacon, /metrics)."""
        return {
            "checks": self.stats.checks,
            "divergent_buckets": self.stats.divergent_buckets,
            "unrepaired_buckets": self.stats.unrepaired_buckets,
            "skipped_buckets": self.stats.skipped_buckets,
            "abandoned": self.stats.abandoned,
            "repairs": self.stats.repairs,
            "last_checked_at": self.stats.last_checked_at,
        }


def _streaks(raw: object) -> Streaks:
    """What a store kept, read defensively (a hand-edited or older record counts as none)."""
    if not isinstance(raw, dict):
        return {}
    return {
        entity: {b: n for b, n in found.items() if isinstance(n, int)}
        for entity, found in raw.items()
        if isinstance(found, dict)
    }


def is_digests(properties: Any) -> bool:
    return getattr(properties, "type", None) == DIGESTS_TYPE
