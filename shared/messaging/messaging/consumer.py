"""Consumer runtime: deliver envelopes to a handler, ack only after it committed.

The pika connection lives on the thread that calls run(); handlers run on a worker thread, so
heartbeats keep flowing during a long handler. Outcomes go back to the I/O thread, which
publishes retry or dead copies with confirms before acknowledging the original: a crash in
between can duplicate a message (the handlers are idempotent) but never lose one.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from .connection import HEARTBEAT_SECONDS, Backoff, StopFlag, amqp_parameters
from .envelope import DecodeError, Envelope, decode
from .errors import PermanentError, RetryableError
from .logs import bound
from .retry import Decision, decide, resent_properties
from .topology import Topology

log = logging.getLogger("messaging.consumer")

Handler = Callable[[Envelope], None]
BatchHandler = Callable[[Sequence[Envelope]], None]


@dataclass(frozen=True)
class ConsumerSettings:
    amqp_url: str
    topology: Topology
    prefetch: int = 1000
    max_batch: int = 500
    shutdown_timeout: float = 10.0
    heartbeat: int = HEARTBEAT_SECONDS


# Upper bounds (seconds) of the handler-duration histogram the API processes export.
HANDLER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass
class ConsumerStats:
    connections: int = 0
    consumed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    last_occurred_at: datetime | None = None
    handler_counts: list[int] = field(default_factory=lambda: [0] * (len(HANDLER_BUCKETS) + 1))
    handler_seconds: float = 0.0

    def observe(self, seconds: float, messages: int) -> None:
        """One handler call (of `messages` messages) took `seconds`."""
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
            "connections": self.connections,
            "last_occurred_at": self.last_occurred_at.isoformat()
            if self.last_occurred_at
            else None,
            "handler_buckets": list(HANDLER_BUCKETS),
            "handler_counts": list(self.handler_counts),
            "handler_seconds": self.handler_seconds,
        }


@dataclass(frozen=True)
class _Delivery:
    generation: int
    tag: int
    properties: Any
    body: bytes


@dataclass(frozen=True)
class _Outcome:
    delivery: _Delivery
    decision: Decision | None  # None: applied, just ack


class Consumer:
    """Consume one service's work queue until stop(); reconnects after any broker failure."""

    def __init__(
        self,
        settings: ConsumerSettings,
        handler: Handler,
        batch_handler: BatchHandler | None = None,
        on_outcome: Callable[[str, float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.topology = settings.topology
        self.handler = handler
        self.batch_handler = batch_handler
        self.on_outcome = on_outcome
        self.stats = ConsumerStats()
        self.attached = threading.Event()
        self._stop = StopFlag()
        self._inbox: queue.Queue[_Delivery] = queue.Queue()
        self._generation = 0
        self._busy = threading.Event()  # the worker holds a batch not yet settled
        self._conn: BlockingConnection | None = None

    # -- public --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking messages, finish the batch in hand, return the rest; thread-safe."""
        self._stop.set()

    def run(self) -> None:
        worker = threading.Thread(target=self._work, name="consumer-worker", daemon=True)
        worker.start()
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                self._session()
                backoff.reset()
            except (pika.exceptions.AMQPError, OSError) as exc:
                self.attached.clear()
                delay = backoff.next()
                log.warning(
                    "consumer %s lost the broker (%s: %s); reconnecting in %.1fs",
                    self.topology.queue,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                self._stop.wait(delay)
        worker.join(timeout=self.settings.shutdown_timeout)
        log.info("consumer %s stopped", self.topology.queue)

    # -- I/O thread ----------------------------------------------------------------------------
    def _session(self) -> None:
        params = amqp_parameters(self.settings.amqp_url, f"{self.topology.service}-consumer")
        params.heartbeat = self.settings.heartbeat
        conn = BlockingConnection(params)
        self.stats.connections += 1
        self._generation += 1
        generation = self._generation
        try:
            self._conn = conn
            channel = conn.channel()
            self.topology.declare(channel)
            publisher = conn.channel()
            publisher.confirm_delivery()
            channel.basic_qos(prefetch_count=self.settings.prefetch)
            tag = channel.basic_consume(
                self.topology.queue,
                on_message_callback=lambda _ch, method, props, body: self._inbox.put(
                    _Delivery(generation, method.delivery_tag, props, body)
                ),
            )
            self._channel, self._publisher = channel, publisher
            self.attached.set()
            log.info("consumer attached to %s", self.topology.queue)
            while not self._stop.is_set():
                conn.process_data_events(time_limit=0.2)
            self._drain(channel, tag)
        finally:
            self.attached.clear()
            self._conn = None
            if conn.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    conn.close()  # unacked deliveries go back to the queue

    def _drain(self, channel: BlockingChannel, consumer_tag: str) -> None:
        """Stop deliveries, let the worker settle the batch in hand, return everything else."""
        channel.basic_cancel(consumer_tag)
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while self._busy.is_set() and time.monotonic() < deadline:
            self._conn.process_data_events(time_limit=0.05)
        self._conn.process_data_events(time_limit=0)

    def _settle(self, outcomes: list[_Outcome]) -> None:
        """Runs on the I/O thread: copy retries and dead letters (confirmed), then ack all."""
        try:
            if not outcomes or outcomes[0].delivery.generation != self._generation:
                return  # deliveries of a closed channel: the broker redelivers them
            for outcome in outcomes:
                if outcome.decision is not None:
                    self._republish(outcome.delivery, outcome.decision)
            self._channel.basic_ack(outcomes[-1].delivery.tag, multiple=True)
        finally:
            self._busy.clear()

    def _republish(self, delivery: _Delivery, decision: Decision) -> None:
        props = delivery.properties
        headers = dict(props.headers or {})
        headers.update(decision.headers)
        self._publisher.basic_publish(
            exchange="",
            routing_key=decision.queue,
            body=delivery.body,
            properties=resent_properties(props, headers),
            mandatory=True,
        )
        if decision.dead:
            self.stats.dead_lettered += 1
            log.error(
                "dead-lettered message %s to %s: %s",
                props.message_id,
                decision.queue,
                decision.headers.get("x-dead-reason"),
                extra={"correlation_id": props.correlation_id},
            )
        else:
            self.stats.retried += 1
            log.warning(
                "retrying message %s via %s: %s",
                props.message_id,
                decision.queue,
                decision.headers.get("x-last-error"),
                extra={"correlation_id": props.correlation_id},
            )

    # -- worker thread -------------------------------------------------------------------------
    def _work(self) -> None:
        while not (self._stop.is_set() and self._inbox.empty()):
            try:
                first = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if self._stop.is_set():
                continue  # stopping: leave it unacked, the broker returns it to the queue
            batch = [first]
            while len(batch) < self.settings.max_batch:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            batch = [d for d in batch if d.generation == self._generation]
            if not batch:
                continue
            self._busy.set()
            outcomes = self._process(batch)
            conn = self._conn
            if conn is None or batch[0].generation != self._generation:
                self._busy.clear()
                continue
            try:
                conn.add_callback_threadsafe(lambda o=outcomes: self._settle(o))
            except Exception:  # the connection went away: redelivery takes over
                self._busy.clear()

    def _process(self, batch: list[_Delivery]) -> list[_Outcome]:
        outcomes: dict[int, _Outcome] = {}
        decoded: list[tuple[_Delivery, Envelope]] = []
        for delivery in batch:
            try:
                decoded.append((delivery, decode(delivery.body)))
            except DecodeError as exc:
                outcomes[delivery.tag] = _Outcome(
                    delivery, decide(self.topology, delivery.properties, exc, permanent=True)
                )
        if self.batch_handler is not None and len(decoded) > 1:
            started = time.perf_counter()
            try:
                self.batch_handler([env for _, env in decoded])
            except Exception:
                log.warning("batch of %d failed; applying one by one", len(decoded), exc_info=True)
            else:
                self._record(decoded, time.perf_counter() - started)
                for delivery, _ in decoded:
                    outcomes[delivery.tag] = _Outcome(delivery, None)
                decoded = []
        for delivery, envelope in decoded:
            outcomes[delivery.tag] = self._apply_one(delivery, envelope)
        return [outcomes[d.tag] for d in batch]

    def _apply_one(self, delivery: _Delivery, envelope: Envelope) -> _Outcome:
        with bound(envelope.correlation_id):
            return self._apply_bound(delivery, envelope)

    def _apply_bound(self, delivery: _Delivery, envelope: Envelope) -> _Outcome:
        started = time.perf_counter()
        try:
            self.handler(envelope)
        except PermanentError as exc:
            return _Outcome(
                delivery, decide(self.topology, delivery.properties, exc, permanent=True)
            )
        except Exception as exc:  # RetryableError and the unforeseen: retry on the schedule
            log.warning(
                "handler failed on %s %s v%d: %s",
                envelope.event_type,
                envelope.entity_id,
                envelope.entity_version,
                exc,
                exc_info=not isinstance(exc, RetryableError),
            )
            return _Outcome(delivery, decide(self.topology, delivery.properties, exc))
        self._record([(delivery, envelope)], time.perf_counter() - started)
        log.debug(
            "applied %s %s v%d", envelope.event_type, envelope.entity_id, envelope.entity_version
        )
        return _Outcome(delivery, None)

    def _record(self, applied: list[tuple[_Delivery, Envelope]], seconds: float) -> None:
        self.stats.observe(seconds, len(applied))
        self.stats.last_occurred_at = applied[-1][1].occurred_at
        if self.on_outcome is not None:
            self.on_outcome("applied", seconds)
