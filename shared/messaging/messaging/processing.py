"""Every decision a consumer makes about a batch of deliveries, apart from the broker.

The real runtime (consumer.py) and the in-memory broker of the tests (testing.py) hand their
deliveries to the same `Processor`, so filtering, validation, dispatch, the batch-then-one-by-one
fallback and the retry and dead-letter decisions run as in production whichever broker delivers
(the fake replaces only the broker). For each delivery it returns an outcome: applied (nothing to
publish) or a decision (a retry queue or the dead queue, with headers). A store that is away or
refuses writes is nobody's outcome: `process` raises StoreUnavailable and the caller holds the
batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from servicekit import tracing
from servicekit.logs import bound

from .envelope import DecodeError, Envelope, decode
from .errors import PermanentError, RetryableError, StoreUnavailable
from .handlers import Handlers
from .healing import READY, Healing, replay_completion, replay_request_of
from .retry import Decision, dead_letter, decide
from .topology import Topology
from .verification import Verification, VerificationStats, is_digests

log = logging.getLogger("messaging.consumer")

Apply = Callable[[Sequence[Any]], None]

# A message the broker has delivered this many times without it being settled kills or stalls
# its consumer: it goes to the dead queue before it can do so again.
MAX_REDELIVERIES = 10

# Upper bounds (seconds) of the handler-duration histogram the API processes export.
HANDLER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Delivery(Protocol):
    """What a broker delivered: the real runtime's and the in-memory bus's both have these."""

    redelivered: bool
    properties: Any
    body: bytes


@dataclass(frozen=True)
class Outcome:
    delivery: Any
    decision: Decision | None  # None: applied, ignored or a control message: just acknowledge


@dataclass
class ConsumerStats:
    connections: int = 0
    consumed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    ignored: int = 0
    paused: int = 0
    last_occurred_at: datetime | None = None
    handler_counts: list[int] = field(default_factory=lambda: [0] * (len(HANDLER_BUCKETS) + 1))
    handler_seconds: float = 0.0
    verification: VerificationStats | None = None

    def observe(self, seconds: float, messages: int) -> None:
        """One apply (of `messages` messages) took `seconds`."""
        index = next((i for i, b in enumerate(HANDLER_BUCKETS) if seconds <= b), -1)
        self.handler_counts[index] += 1
        self.handler_seconds += seconds
        self.consumed += messages

    def snapshot(self) -> dict[str, Any]:
        """What an API process exports: JSON-ready, written where it can read it."""
        return {
            "consumed": self.consumed,
            "retried": self.retried,
            "dead_lettered": self.dead_lettered,
            "ignored": self.ignored,
            "paused": self.paused,
            "connections": self.connections,
            "last_occurred_at": self.last_occurred_at.isoformat()
            if self.last_occurred_at
            else None,
            "handler_buckets": list(HANDLER_BUCKETS),
            "handler_counts": list(self.handler_counts),
            "handler_seconds": self.handler_seconds,
            **(
                {
                    "verifications": self.verification.checks,
                    "divergent_buckets": self.verification.divergent_buckets,
                    "unrepaired_buckets": self.verification.unrepaired_buckets,
                    "skipped_buckets": self.verification.skipped_buckets,
                    "abandoned_verifications": self.verification.abandoned,
                    "repairs": self.verification.repairs,
                    "last_verified_at": self.verification.last_checked_at,
                }
                if self.verification is not None
                else {}
            ),
        }


@dataclass
class _Ready:
    delivery: Any
    envelope: Envelope
    change: Any = None


class Processor:
    """Judge, filter, validate, translate and apply a batch; return each delivery's outcome."""

    def __init__(
        self,
        topology: Topology,
        handlers: Handlers,
        apply: Apply | None = None,
        *,
        healing: Healing | None = None,
        verification: Verification | None = None,
        max_redeliveries: int = MAX_REDELIVERIES,
        stats: ConsumerStats | None = None,
    ) -> None:
        self.topology, self.handlers, self.apply = topology, handlers, apply
        self.healing, self.max_redeliveries = healing, max_redeliveries
        self.verification = verification
        self.stats = stats or ConsumerStats()
        if verification is not None:
            self.stats.verification = verification.stats

    @property
    def span(self) -> str:
        return f"apply {self.topology.queue}"

    def process(self, batch: Sequence[Delivery]) -> list[Outcome]:
        """Outcomes in the batch's order; raises StoreUnavailable if the store is away."""
        outcomes: dict[int, Outcome] = {}
        ready: list[_Ready] = []
        # Each digests message, and how many of the batch's events came before it.
        verifications: list[tuple[Delivery, int]] = []
        for delivery in batch:
            if is_digests(delivery.properties):
                # compared once the events before it are applied (those behind it are too, so
                # their buckets are left out of its check)
                verifications.append((delivery, len(ready)))
                continue
            try:
                early = self._judge(delivery)
            except StoreUnavailable:
                raise  # a completion met a store blip: the batch waits, nothing is dead
            except Exception as exc:  # judging must never stop the batch
                early = Outcome(delivery, dead_letter(self.topology, "judging failed:", exc))
            if isinstance(early, Outcome):
                outcomes[id(delivery)] = early
            else:
                ready.append(_Ready(delivery, early))
        judged = [item.envelope for item in ready]
        if self.verification is not None and judged:
            # A check under way: these change what it sums, applied in full or in part.
            self.verification.touch(judged)
        if self.apply is None:
            for item in ready:  # the functions write themselves: one event at a time
                outcomes[id(item.delivery)] = self._one(item, translate_only=True)
        else:
            ready = self._translated(ready, outcomes)
            for item, outcome in self._applied(ready):
                outcomes[id(item.delivery)] = outcome
        for delivery, before in verifications:
            outcomes[id(delivery)] = self._verify(delivery, judged[before:])
        result = [outcomes[id(d)] for d in batch]
        self._count_replayed(result)
        return result

    # -- before any handler ----------------------------------------------------------------
    def _judge(self, delivery: Delivery) -> Outcome | Envelope:
        """Control messages, crash loops, undecodable bodies, types not declared."""
        completion = replay_completion(delivery.properties, delivery.body)
        if isinstance(completion, str):
            return Outcome(delivery, dead_letter(self.topology, completion))
        if completion is not None:
            if self.healing is not None:
                self.healing.completed(*completion)
            return Outcome(delivery, None)
        if delivery.redelivered:
            count = _redeliveries(delivery.properties)
            if count >= self.max_redeliveries:
                why = (
                    f"delivered {count + 1} times without being settled: it stops or kills "
                    "its consumer"
                )
                return Outcome(delivery, dead_letter(self.topology, why))
        try:
            envelope = decode(delivery.body)
        except DecodeError as exc:
            return Outcome(
                delivery, decide(self.topology, delivery.properties, exc, permanent=True)
            )
        if not self.handlers.handles(envelope.event_type):
            self.stats.ignored += 1
            return Outcome(delivery, None)
        return envelope

    @property
    def verifying(self) -> bool:
        """A verification is under way: `verify_step()` has work between batches."""
        return self.verification is not None and self.verification.checking

    def verify_step(self) -> bool:
        """One more part of a verification under way (the worker calls it between batches);
        True while it has more. A failure abandons the check: the next one comes in time."""
        if self.verification is None:
            return False
        if self.healing is not None and self.healing.state != READY:
            self.verification.abandon()  # the store is being rebuilt: nothing to compare yet
            return False
        try:
            return self.verification.step()
        except Exception as exc:
            self.verification.abandon()
            log.warning("verification of %s abandoned: %s", self.topology.queue, exc)
            return False

    def _verify(self, delivery: Delivery, behind: list[Envelope]) -> Outcome:
        """The producer's digests, for a verification: compared with the model's. `behind`:
        the batch's events that came after them, applied already."""
        if self.verification is None:
            return Outcome(delivery, None)  # a replica that does not verify: nothing to do
        try:
            self.verification.received(delivery.body, behind)
        except StoreUnavailable:
            raise  # the batch waits for the store
        except Exception as exc:
            return Outcome(delivery, dead_letter(self.topology, "verification failed:", exc))
        return Outcome(delivery, None)

    # -- translating and applying ----------------------------------------------------------
    def _translated(self, ready: list[_Ready], outcomes: dict[int, Outcome]) -> list[_Ready]:
        """Each event's change; an event whose translation fails gets its outcome now."""
        kept = []
        for item in ready:
            try:
                with bound(item.envelope.correlation_id):
                    item.change = self.handlers.translate(item.envelope)
            except StoreUnavailable:
                raise
            except BaseException as exc:
                outcomes[id(item.delivery)] = self._failed(item, exc)
            else:
                kept.append(item)
        return kept

    def _applied(self, ready: list[_Ready]) -> list[tuple[_Ready, Outcome]]:
        if len(ready) > 1:
            started = time.perf_counter()
            try:
                with tracing.continued(self.span, [i.delivery.properties.headers for i in ready]):
                    self.apply([item.change for item in ready])
            except StoreUnavailable:
                raise
            except BaseException as exc:  # SystemExit, CancelledError: still the batch's failure
                # Each event on its own finds the one at fault (its failure is logged there);
                # the batch's round trip is paid again, once per event.
                log.warning(
                    "a batch of %d failed (%s: %s); applying its events one by one",
                    len(ready),
                    type(exc).__name__,
                    str(exc)[:200],
                )
            else:
                self._record(ready, time.perf_counter() - started)
                return [(item, Outcome(item.delivery, None)) for item in ready]
        return [(item, self._one(item)) for item in ready]

    def _one(self, item: _Ready, translate_only: bool = False) -> Outcome:
        started = time.perf_counter()
        try:
            with (
                bound(item.envelope.correlation_id),
                tracing.continued(self.span, [item.delivery.properties.headers]),
            ):
                if translate_only:
                    self.handlers.translate(item.envelope)
                else:
                    self.apply([item.change])
        except StoreUnavailable:
            raise
        except BaseException as exc:  # even SystemExit or CancelledError: the event's failure
            return self._failed(item, exc)
        self._record([item], time.perf_counter() - started)
        envelope = item.envelope
        log.debug(
            "applied %s %s v%d", envelope.event_type, envelope.entity_id, envelope.entity_version
        )
        return Outcome(item.delivery, None)

    def _failed(self, item: _Ready, exc: BaseException) -> Outcome:
        properties = item.delivery.properties
        if isinstance(exc, PermanentError):
            return Outcome(item.delivery, decide(self.topology, properties, exc, permanent=True))
        envelope = item.envelope
        log.warning(
            "handler failed on %s %s v%d: %s",
            envelope.event_type,
            envelope.entity_id,
            envelope.entity_version,
            exc,
            exc_info=not isinstance(exc, RetryableError),
        )
        return Outcome(item.delivery, decide(self.topology, properties, exc))

    def _record(self, applied: list[_Ready], seconds: float) -> None:
        self.stats.observe(seconds, len(applied))
        self.stats.last_occurred_at = applied[-1].envelope.occurred_at

    def _count_replayed(self, outcomes: list[Outcome]) -> None:
        """Tell healing how many replayed events this batch settled for good (applied,
        ignored or dead: not retried), so a rebuild is declared over only once all were."""
        if self.healing is None:
            return
        counts: dict[str, int] = {}
        for outcome in outcomes:
            if outcome.decision is None or outcome.decision.dead:
                request_id = replay_request_of(outcome.delivery.properties)  # not completions
                if request_id:
                    counts[request_id] = counts.get(request_id, 0) + 1
        for request_id, settled in counts.items():
            self.healing.replayed(request_id, settled)


def _redeliveries(properties: Any) -> int:
    """The broker's count of earlier deliveries (quorum queues' x-delivery-count), or 0."""
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    count = headers.get("x-delivery-count")
    return count if isinstance(count, int) and not isinstance(count, bool) else 0
