"""In-memory bus for unit tests: the broker's fanout, retries and dead letters on a virtual clock.

It runs the same decisions as the real consumer runtime (`retry.decide`) and records `x-death`
the way RabbitMQ does when a retry queue's TTL expires, so headers and outcomes match; the
contract tests in shared/messaging/tests run against both.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from .consumer import BatchHandler, Handler
from .envelope import DecodeError, Envelope, decode
from .errors import PermanentError
from .healing import READY, REBUILDING, Generation
from .retry import decide
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
class _Subscriber:
    topology: Topology
    handler: Handler
    batch_handler: BatchHandler | None
    handles: frozenset[str] | None = None
    ready: deque[Message] = field(default_factory=deque)
    dead: list[Message] = field(default_factory=list)
    applied: int = 0
    ignored: int = 0


class InMemoryBus:
    """A fanout exchange with subscribed work queues; nothing happens until you deliver."""

    def __init__(self) -> None:
        self.now = 0.0
        self._subscribers: dict[str, _Subscriber] = {}
        self._delayed: list[tuple[float, int, str, str, Message]] = []
        self._seq = itertools.count()

    def subscribe(
        self,
        topology: Topology,
        handler: Handler,
        batch_handler: BatchHandler | None = None,
        handles: frozenset[str] | None = None,
    ) -> None:
        self._subscribers[topology.queue] = _Subscriber(topology, handler, batch_handler, handles)

    def publish(self, message: Envelope | Message) -> None:
        """Fan a message out to every subscribed queue (an Envelope is encoded first)."""
        if isinstance(message, Envelope):
            message = Message(
                message.to_json(), str(message.event_id), message.event_type, message.correlation_id
            )
        for sub in self._subscribers.values():
            sub.ready.append(
                Message(
                    message.body,
                    message.message_id,
                    message.type,
                    message.correlation_id,
                    dict(message.headers),
                )
            )

    def dead_letters(self, queue: str) -> list[Message]:
        return list(self._subscribers[queue].dead)

    def pending(self) -> int:
        return sum(len(s.ready) for s in self._subscribers.values()) + len(self._delayed)

    def deliver(self, max_batch: int = 1) -> int:
        """Hand every ready message to its handler (in batches of up to max_batch)."""
        handled = 0
        for sub in self._subscribers.values():
            while sub.ready:
                batch = [sub.ready.popleft() for _ in range(min(max_batch, len(sub.ready)))]
                self._handle(sub, batch)
                handled += len(batch)
        return handled

    def advance(self, seconds: float) -> None:
        """Move the virtual clock; expired retries go back to their work queues."""
        self.now += seconds
        while self._delayed and self._delayed[0][0] <= self.now:
            _, _, queue, retry_queue, msg = heapq.heappop(self._delayed)
            _record_expiry(msg, retry_queue)
            self._subscribers[queue].ready.append(msg)

    def run_until_idle(self, max_batch: int = 1, limit: int = 100_000) -> None:
        """Deliver, then jump the clock to each pending retry, until nothing is left."""
        for _ in range(limit):
            self.deliver(max_batch)
            if not self._delayed:
                return
            self.advance(self._delayed[0][0] - self.now)
        raise RuntimeError("bus did not become idle")

    def _handle(self, sub: _Subscriber, batch: Sequence[Message]) -> None:
        decoded = []
        for msg in batch:
            try:
                envelope = decode(msg.body)
            except DecodeError as exc:
                self._fail(sub, msg, exc, permanent=True)
                continue
            if sub.handles is not None and envelope.event_type not in sub.handles:
                sub.ignored += 1  # like the runtime: acknowledged, counted, not handled
                continue
            decoded.append((msg, envelope))
        if sub.batch_handler is not None and len(decoded) > 1:
            try:
                sub.batch_handler([env for _, env in decoded])
            except Exception:
                pass  # like the runtime: fall back to one at a time
            else:
                sub.applied += len(decoded)
                return
        for msg, env in decoded:
            try:
                sub.handler(env)
            except PermanentError as exc:
                self._fail(sub, msg, exc, permanent=True)
            except Exception as exc:
                self._fail(sub, msg, exc, permanent=False)
            else:
                sub.applied += 1

    def _fail(self, sub: _Subscriber, msg: Message, exc: BaseException, permanent: bool) -> None:
        decision = decide(sub.topology, msg.properties, exc, permanent=permanent)
        copy = Message(
            msg.body,
            msg.message_id,
            msg.type,
            msg.correlation_id,
            {**msg.headers, **decision.headers},
        )
        if decision.dead:
            sub.dead.append(copy)
            return
        step = sub.topology.retry_queues.index(decision.queue)
        due = self.now + sub.topology.retry_delays[step]
        heapq.heappush(
            self._delayed, (due, next(self._seq), sub.topology.queue, decision.queue, copy)
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
