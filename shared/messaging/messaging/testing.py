"""What tests of a read model need: an in-memory broker, a producer answering its replay and
verification requests, waiting for effects, a generation store.

`InMemoryBus` replaces the broker only: the fanout, retry queues on a virtual clock (recording
`x-death` the way RabbitMQ does when a retry queue's TTL expires) and dead queues. The consumer
attached to it decides everything as in production (the same `Processor`), so headers and
outcomes match; the contract tests in shared/messaging/tests run against both.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from . import digests
from .consumer import Consumer
from .envelope import Envelope
from .errors import StoreUnavailable
from .handlers import Handlers
from .healing import READY, REBUILDING, Generation
from .processing import Apply, ConsumerStats, Processor
from .replay import BUCKETS, DIGESTS, DIGESTS_TYPE, HISTORY, LATEST
from .retry import Decision
from .topology import Topology


@dataclass
class Message:
    body: bytes
    message_id: str | None = None
    type: str | None = None
    correlation_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)

    @property
    def properties(self) -> SimpleNamespace:
        return SimpleNamespace(
            message_id=self.message_id,
            type=self.type,
            correlation_id=self.correlation_id,
            headers=self.headers,
        )


@dataclass
class _Delivered:
    """A message as the in-memory broker hands it to a consumer's processor."""

    message: Message
    redelivered: bool = False

    @property
    def properties(self) -> SimpleNamespace:
        return self.message.properties

    @property
    def body(self) -> bytes:
        return self.message.body


@dataclass
class _Queue:
    topology: Topology
    processor: Processor
    ready: deque[Message] = field(default_factory=deque)
    dead: list[Message] = field(default_factory=list)
    paused: bool = False  # its store was away at the last delivery: it holds what it has


class InMemoryBus:
    """A fanout exchange with work queues, retry queues on a virtual clock and dead queues: the
    broker, and only the broker. Each queue's messages go through the attached consumer's own
    processor (processing.py), so its declared handlers, validation, dispatch, batching and
    retry decisions run exactly as in production. Nothing happens until you deliver."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queues: dict[str, _Queue] = {}
        self._delayed: list[tuple[float, int, str, str, Message]] = []
        self._seq = itertools.count()

    def attach(self, consumer: Consumer) -> Consumer:
        """Bind a consumer (built by its process's own composition root) to a queue here."""
        self._queues[consumer.topology.queue] = _Queue(consumer.topology, consumer.processor)
        return consumer

    def subscribe(
        self,
        topology: Topology,
        handlers: Handlers | Callable[[Envelope], Any],
        apply: Apply | None = None,
    ) -> Processor:
        """A queue for `topology` whose messages go to these handlers (no process around)."""
        if not isinstance(handlers, Handlers):
            handlers = Handlers.every(handlers)
        processor = Processor(topology, handlers, apply)
        self._queues[topology.queue] = _Queue(topology, processor)
        return processor

    def stats(self, queue: str) -> ConsumerStats:
        return self._queues[queue].processor.stats

    def ready(self, queue: str) -> deque[Message]:
        """A queue's ready messages, in delivery order (a test may reorder them, as a broker's
        redeliveries and retries do)."""
        return self._queues[queue].ready

    def publish(self, message: Envelope | Message) -> None:
        """Fan a message out to every queue (an Envelope is encoded first, as the relay does)."""
        if isinstance(message, Envelope):
            message = Message(
                message.to_json(), str(message.event_id), message.event_type, message.correlation_id
            )
        for queue in self._queues.values():
            queue.ready.append(
                Message(
                    message.body,
                    message.message_id,
                    message.type,
                    message.correlation_id,
                    dict(message.headers),
                )
            )

    def send(self, queue: str, message: Message) -> None:
        """Put a message straight into one queue (as a replay or a dead-letter replay does)."""
        self._queues[queue].ready.append(message)

    def dead_letters(self, queue: str) -> list[Message]:
        return list(self._queues[queue].dead)

    def pending(self) -> int:
        return sum(len(q.ready) for q in self._queues.values()) + len(self._delayed)

    def deliver(self, max_batch: int = 1) -> int:
        """Hand every ready message to its consumer (in batches of up to max_batch); a queue
        whose store is away keeps its batch, as the runtime holds it. How many were settled.
        A verification under way goes one part further after each batch, as in the runtime,
        and to its end once the queue is empty (the runtime's idle worker)."""
        handled = 0
        for queue in self._queues.values():
            queue.paused = False
            while queue.ready:
                batch = [queue.ready[n] for n in range(min(max_batch, len(queue.ready)))]
                try:
                    outcomes = queue.processor.process([_Delivered(m) for m in batch])
                except StoreUnavailable:
                    queue.paused = True
                    queue.processor.stats.paused += 1
                    break
                for _ in batch:
                    queue.ready.popleft()
                for outcome in outcomes:
                    if outcome.decision is not None:
                        self._route(queue, outcome.delivery.message, outcome.decision)
                handled += len(batch)
                queue.processor.verify_step()
            if not queue.paused:
                while queue.processor.verify_step():
                    pass
        return handled

    def advance(self, seconds: float) -> None:
        """Move the virtual clock; expired retries go back to their work queues."""
        self.now += seconds
        while self._delayed and self._delayed[0][0] <= self.now:
            _, _, queue, retry_queue, msg = heapq.heappop(self._delayed)
            _record_expiry(msg, retry_queue)
            self._queues[queue].ready.append(msg)

    def run_until_idle(self, max_batch: int = 1, limit: int = 100_000) -> None:
        """Deliver, then jump the clock to each pending retry, until nothing is left (or what
        is left waits for a store that is away)."""
        for _ in range(limit):
            self.deliver(max_batch)
            if not self._delayed:
                return
            self.advance(self._delayed[0][0] - self.now)
        raise RuntimeError("bus did not become idle")

    def _route(self, queue: _Queue, msg: Message, decision: Decision) -> None:
        """A retry or dead copy of a message, as the runtime publishes it."""
        copy = Message(
            msg.body,
            msg.message_id,
            msg.type,
            msg.correlation_id,
            {**msg.headers, **decision.headers},
        )
        if decision.dead:
            queue.processor.stats.dead_lettered += 1
            queue.dead.append(copy)
            return
        queue.processor.stats.retried += 1
        step = queue.topology.retry_queues.index(decision.queue)
        due = self.now + queue.topology.retry_delays[step]
        heapq.heappush(
            self._delayed, (due, next(self._seq), queue.topology.queue, decision.queue, copy)
        )


def _record_expiry(msg: Message, retry_queue: str) -> None:
    """Update x-death as RabbitMQ does when a message expires from a queue."""
    deaths = [dict(d) for d in msg.headers.get("x-death", [])]
    for entry in deaths:
        if entry.get("queue") == retry_queue and entry.get("reason") == "expired":
            entry["count"] = entry.get("count", 1) + 1
            deaths.remove(entry)
            deaths.insert(0, entry)
            break
    else:
        deaths.insert(0, {"queue": retry_queue, "reason": "expired", "count": 1})
    msg.headers["x-death"] = deaths


class MemoryProducer:
    """The producer's side of a consumer's replay and verification requests, for a queue of an
    InMemoryBus: answered from the events it published (`events()`, in order), as the replay
    server answers from the outbox. Give it to a consumer's verification:
    `consumer.verification.request = MemoryProducer(bus, queue, lambda: published)`.
    """

    def __init__(self, bus: InMemoryBus, queue: str, events: Callable[[], list[Envelope]]):
        self.bus, self.queue, self.events = bus, queue, events
        self.asked: list[tuple[str, str]] = []  # (request id, scope), as they came

    def latest(self) -> list[Envelope]:
        found: dict[tuple[str, str], Envelope] = {}
        for envelope in self.events():
            key = (envelope.entity, envelope.entity_id)
            if key not in found or found[key].entity_version < envelope.entity_version:
                found[key] = envelope
        return list(found.values())

    def __call__(
        self,
        request_id: str,
        scope: str = LATEST,
        *,
        buckets: dict[str, list[int]] | None = None,
        reply_to: str | None = None,
    ) -> None:
        self.asked.append((request_id, scope))
        if scope == DIGESTS:
            found = digests.of_versions(  # a deleted entity counts nothing
                (e.entity, e.entity_id, e.entity_version)
                for e in self.latest()
                if e.change != "deleted"
            )
            body = digests.answer(found, [request_id], [reply_to] if reply_to else [])
            self.bus.send(self.queue, Message(body, f"{request_id}:digests", DIGESTS_TYPE))
            return
        chosen = (
            [
                e
                for e in self.latest()
                if digests.bucket(e.entity, e.entity_id) in (buckets or {}).get(e.entity, ())
            ]
            if scope == BUCKETS
            else self.events()
            if scope == HISTORY
            else self.latest()
        )
        for envelope in chosen:
            self.bus.send(
                self.queue,
                Message(
                    envelope.to_json(),
                    str(envelope.event_id),
                    envelope.event_type,
                    envelope.correlation_id,
                ),
            )


class MemoryGeneration:
    """A read model's generation marker (healing.GenerationStore) in memory, for tests."""

    def __init__(self) -> None:
        self.marker: Generation | None = None
        self.expected, self.settled = -1, 0
        self._lock = threading.Lock()

    def generation(self) -> Generation | None:
        return self.marker

    def claim_rebuild(self, request_id: str) -> bool:
        with self._lock:
            if self.marker is not None:
                return False
            self.begin_rebuild(request_id, 0.0)
            return True

    def begin_rebuild(self, request_id: str, since: float) -> None:
        self.marker = Generation(REBUILDING, request_id, since)
        self.expected, self.settled = -1, 0

    def renew_rebuild(self, request_id: str, since: float) -> bool:
        with self._lock:
            marker = self.marker
            if marker is None or marker.request_id != request_id or marker.state != REBUILDING:
                return False
            self.begin_rebuild(request_id, since)
            return True

    def finish_rebuild(self, request_id: str, events: int) -> bool:
        return self._progress(request_id, expected=events)

    def count_replayed(self, request_id: str, settled: int) -> bool:
        return self._progress(request_id, settled=settled)

    def abandon(self, request_id: str) -> bool:
        with self._lock:
            if self.marker is None or self.marker.request_id != request_id:
                return False
            self.marker = None
            return True

    def _progress(self, request_id: str, expected: int | None = None, settled: int = 0) -> bool:
        with self._lock:
            marker = self.marker
            if marker is None or marker.request_id != request_id or marker.state != REBUILDING:
                return False
            self.expected = self.expected if expected is None else expected
            self.settled += settled
            if self.expected < 0 or self.settled < self.expected:
                return False
            self.marker = Generation(READY, request_id, marker.since)
            return True


def publish(amqp_url: str, exchange: str, *events: Envelope) -> None:
    """Publish events to an exchange as a producer's relay does: the same properties
    (event_properties), persistent, mandatory, each confirmed.

    A queue must be bound to the exchange first: a consumer declares its queues when it
    attaches (`messaging declare SERVICE ...` does it without one). An event no queue would
    receive is refused, saying so, rather than lost.
    """
    import pika

    from .connection import connect
    from .publisher import event_properties

    conn = connect(amqp_url, "test-publish")
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for event in events:
            try:
                channel.basic_publish(
                    exchange,
                    "",
                    event.to_json(),
                    event_properties(str(event.event_id), event.event_type, event.correlation_id),
                    mandatory=True,
                )
            except pika.exceptions.UnroutableError:
                raise RuntimeError(
                    f"no queue is bound to exchange {exchange!r}: attach a consumer (or run "
                    "`messaging declare SERVICE`) before publishing"
                ) from None
    finally:
        if conn.is_open:
            conn.close()


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 15.0,
    interval: float = 0.01,
    what: str = "condition",
) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def running(component: Any, join_timeout: float = 30.0) -> Iterator[threading.Thread]:
    """Run a relay or consumer (anything with run() and stop()) on a thread for a with-block."""
    thread = threading.Thread(target=component.run, name=type(component).__name__, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        component.stop()
        thread.join(join_timeout)
        if thread.is_alive():
            raise AssertionError(f"{type(component).__name__} did not stop within {join_timeout}s")
