"""Consumer runtime: deliver envelopes to a handler, ack only after it committed.

The pika connection lives on the thread that calls run(); handlers run on a worker thread, so
heartbeats keep flowing during a long handler. Outcomes go back to the I/O thread, which
publishes retry or dead copies with confirms before acknowledging the original: a crash in
between can duplicate a message (the handlers are idempotent) but never lose one.

Nothing a message carries can end the worker: a message whose headers cannot be judged is
dead-lettered with the reason, an exception anywhere in judging or settling is contained, and
the I/O thread starts a new worker if one ever dies. A handler whose store does not answer raises
StoreUnavailable: the runtime then stops taking messages, returns those in hand without counting
an attempt, and resumes once `probe()` answers. `health()` says whether messages are being
applied; the process's beacon reports it to /ready.
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

from . import tracing
from .connection import HEARTBEAT_SECONDS, Backoff, StopFlag, connect
from .envelope import DecodeError, Envelope, decode
from .errors import PermanentError, RetryableError, StoreUnavailable
from .healing import Healing
from .logs import bound
from .replay import completed_request
from .retry import Decision, dead_letter, decide, resent_properties
from .topology import Topology

log = logging.getLogger("messaging.consumer")

Handler = Callable[[Envelope], None]
BatchHandler = Callable[[Sequence[Envelope]], None]

# A message the broker has delivered this many times without it being settled kills or stalls
# its consumer: it goes to the dead queue before it can do so again.
MAX_REDELIVERIES = 10


@dataclass(frozen=True)
class ConsumerSettings:
    amqp_url: str
    topology: Topology
    prefetch: int = 1000
    max_batch: int = 500
    shutdown_timeout: float = 10.0
    stall_after: float = 60.0  # messages waiting this long with nothing settled: not healthy
    heartbeat: int = HEARTBEAT_SECONDS


# Upper bounds (seconds) of the handler-duration histogram the API processes export.
HANDLER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


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
            "ignored": self.ignored,
            "paused": self.paused,
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
    lease: int  # the channel lease it came on: a closed channel or a pause ends a lease
    tag: int
    redelivered: bool
    properties: Any
    body: bytes


@dataclass(frozen=True)
class _Outcome:
    delivery: _Delivery
    decision: Decision | None  # None: applied (or a control message), just ack


class _Broken(pika.exceptions.AMQPError):
    """The session cannot go on (a settle failed): reconnect; unacked messages come back."""


class Consumer:
    """Consume one service's work queue until stop(); reconnects after any broker failure."""

    def __init__(
        self,
        settings: ConsumerSettings,
        handler: Handler,
        batch_handler: BatchHandler | None = None,
        *,
        probe: Callable[[], None] | None = None,
        healing: Healing | None = None,
        handles: frozenset[str] | None = None,
    ) -> None:
        self.settings = settings
        self.topology = settings.topology
        self.handler = handler
        self.batch_handler = batch_handler
        self.probe = probe
        self.healing = healing
        # The event types the handler is for (None: all): any other is acknowledged and
        # counted as ignored, never handed to a handler that would mistake it for another.
        self.handles = handles
        self.stats = ConsumerStats()
        self.attached = threading.Event()
        self.paused = threading.Event()  # the store does not answer: not taking messages
        self._stop = StopFlag()
        self._inbox: queue.Queue[_Delivery] = queue.Queue()
        self._lease = 0
        self._busy = threading.Event()  # the worker holds a batch not yet settled
        self._progress_at = time.monotonic()
        self._conn: BlockingConnection | None = None
        self._worker: threading.Thread | None = None
        self._consumer_tag: str | None = None

    # -- public --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking messages, finish the batch in hand, return the rest; thread-safe."""
        self._stop.set()

    def health(self) -> str | None:
        """None while messages are being applied; otherwise why not."""
        worker = self._worker
        if worker is None or not worker.is_alive():
            return "the consumer's worker is not running"
        if self.paused.is_set():
            return "paused: the store does not answer"
        waiting = self._inbox.qsize() + (1 if self._busy.is_set() else 0)
        idle_for = time.monotonic() - self._progress_at
        if waiting and idle_for > self.settings.stall_after:
            return f"stalled: messages wait and nothing was settled for {idle_for:.0f}s"
        return None

    def run(self) -> None:
        self._start_worker()
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
        if self._worker is not None:
            self._worker.join(timeout=self.settings.shutdown_timeout)
        log.info("consumer %s stopped", self.topology.queue)

    # -- I/O thread ----------------------------------------------------------------------------
    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._work, name="consumer-worker", daemon=True)
        self._worker.start()

    def _session(self) -> None:
        conn = connect(
            self.settings.amqp_url,
            f"{self.topology.service}-consumer",
            heartbeat=self.settings.heartbeat,
        )
        self.stats.connections += 1
        self._new_lease()
        try:
            self._conn = conn
            self.topology.declare(conn)
            channel = conn.channel()
            publisher = conn.channel()
            publisher.confirm_delivery()
            channel.basic_qos(prefetch_count=self.settings.prefetch)
            self._channel, self._publisher = channel, publisher
            if not self.paused.is_set():
                self._consume()
            self.attached.set()
            log.info("consumer attached to %s", self.topology.queue)
            while not self._stop.is_set():
                conn.process_data_events(time_limit=0.2)
                if not self._stop.is_set() and not (self._worker and self._worker.is_alive()):
                    log.critical("the consumer's worker died; starting a new one")
                    self._start_worker()
            self._drain(channel)
        finally:
            self.attached.clear()
            self._conn = None
            self._consumer_tag = None
            if conn.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    conn.close()  # unacked deliveries go back to the queue

    def _new_lease(self) -> None:
        self._lease += 1
        self._progress_at = time.monotonic()

    def _consume(self) -> None:
        lease = self._lease
        self._consumer_tag = self._channel.basic_consume(
            self.topology.queue,
            on_message_callback=lambda _ch, method, props, body: self._inbox.put(
                _Delivery(lease, method.delivery_tag, bool(method.redelivered), props, body)
            ),
        )

    def _drain(self, channel: BlockingChannel) -> None:
        """Stop deliveries, let the worker settle the batch in hand, return everything else."""
        if self._consumer_tag is not None:
            channel.basic_cancel(self._consumer_tag)
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while self._busy.is_set() and time.monotonic() < deadline:
            self._conn.process_data_events(time_limit=0.05)
        self._conn.process_data_events(time_limit=0)

    def _pause(self) -> None:
        """Runs on the I/O thread: the store is away. Stop deliveries, return what we hold."""
        try:
            if self._consumer_tag is not None:
                self._channel.basic_cancel(self._consumer_tag)
                self._consumer_tag = None
            # Every unacked delivery of the channel, back to the queue; basic.nack is a plain
            # return (RabbitMQ 4.3 counts only basic.reject toward the delivery limit).
            self._channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
            self._new_lease()  # what is still in the inbox belongs to no one now
        finally:
            self._busy.clear()

    def _resume(self) -> None:
        if self._conn is not None and self._consumer_tag is None and self.paused.is_set():
            self.paused.clear()
            self._new_lease()
            self._consume()
            log.info("the store answers again: consuming %s", self.topology.queue)

    def _settle(self, outcomes: list[_Outcome]) -> None:
        """Runs on the I/O thread: copy retries and dead letters (confirmed), then ack all."""
        try:
            if not outcomes or outcomes[0].delivery.lease != self._lease:
                return  # deliveries of a closed channel or a pause: the broker redelivers them
            for outcome in outcomes:
                if outcome.decision is not None:
                    self._republish(outcome.delivery, outcome.decision)
            self._channel.basic_ack(outcomes[-1].delivery.tag, multiple=True)
            self._progress_at = time.monotonic()
        except pika.exceptions.AMQPError:
            raise
        except Exception as exc:  # never let a settle end the I/O loop with an odd error
            raise _Broken(f"settling failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._busy.clear()

    def _republish(self, delivery: _Delivery, decision: Decision) -> None:
        props = delivery.properties
        original = props.headers if isinstance(props.headers, dict) else {}
        try:
            self._publish_copy(delivery, decision, {**original, **decision.headers})
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
            raise  # the broker refused: the session ends and the message comes back
        except pika.exceptions.AMQPError:
            raise
        except Exception as exc:
            # The original headers could not be encoded again (or made the frame too large):
            # the copy goes with ours only, and says so.
            log.warning(
                "message %s: its headers could not be sent again (%s)", props.message_id, exc
            )
            self._publish_copy(
                delivery, decision, {**decision.headers, "x-headers-dropped": str(exc)[:200]}
            )
        if decision.dead:
            self.stats.dead_lettered += 1
            log.error(
                "dead-lettered message %s to %s: %s",
                props.message_id,
                decision.queue,
                decision.headers.get("x-dead-reason"),
                extra={"correlation_id": _text(props.correlation_id)},
            )
        else:
            self.stats.retried += 1
            log.warning(
                "retrying message %s via %s: %s",
                props.message_id,
                decision.queue,
                decision.headers.get("x-last-error"),
                extra={"correlation_id": _text(props.correlation_id)},
            )

    def _publish_copy(self, delivery: _Delivery, decision: Decision, headers: dict) -> None:
        self._publisher.basic_publish(
            exchange="",
            routing_key=decision.queue,
            body=delivery.body,
            properties=resent_properties(delivery.properties, headers),
            mandatory=True,
        )

    def _post(self, callback: Callable[[], None]) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            conn.add_callback_threadsafe(callback)
            return True
        except Exception:  # the connection went away: redelivery takes over
            return False

    # -- worker thread -------------------------------------------------------------------------
    def _work(self) -> None:
        while not (self._stop.is_set() and self._inbox.empty()):
            try:
                self._work_once()
            except Exception:  # a bug of ours: the batch comes back with the next session
                log.exception("consumer worker failed on a batch; carrying on")
                self._busy.clear()

    def _work_once(self) -> None:
        try:
            first = self._inbox.get(timeout=0.2)
        except queue.Empty:
            if not self._busy.is_set():
                self._progress_at = time.monotonic()  # idle is not stalled
            return
        if self._stop.is_set():
            return  # stopping: leave it unacked, the broker returns it to the queue
        batch = [first]
        while len(batch) < self.settings.max_batch:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        lease = self._lease
        batch = [d for d in batch if d.lease == lease]
        if not batch:
            return
        self._busy.set()
        try:
            outcomes = self._process(batch)
        except StoreUnavailable as exc:
            self._wait_for_store(exc)
            return
        if not self._post(lambda o=outcomes: self._settle(o)):
            self._busy.clear()

    def _wait_for_store(self, exc: StoreUnavailable) -> None:
        """Return what we hold, then probe the store until it answers and consume again."""
        self.paused.set()
        self.stats.paused += 1
        log.warning("the store of %s does not answer (%s); pausing", self.topology.queue, exc)
        if not self._post(self._pause):
            self._busy.clear()
        backoff = Backoff(first=0.5, cap=10.0)
        while not self._stop.is_set():
            try:
                if self.probe is not None:
                    self.probe()
                break
            except Exception as again:
                delay = backoff.next()
                log.info("store still away (%s); probing again in %.1fs", again, delay)
                self._stop.wait(delay)
        if not self._post(self._resume):
            self.paused.clear()  # no connection now: the next session consumes at once

    def _process(self, batch: list[_Delivery]) -> list[_Outcome]:
        outcomes: dict[int, _Outcome] = {}
        decoded: list[tuple[_Delivery, Envelope]] = []
        for delivery in batch:
            try:
                early = self._judge(delivery)
            except Exception as exc:  # judging must never stop the batch
                early = _Outcome(delivery, dead_letter(self.topology, "judging failed:", exc))
            if isinstance(early, _Outcome):
                outcomes[delivery.tag] = early
            else:
                decoded.append((delivery, early))
        if self.batch_handler is not None and len(decoded) > 1:
            started = time.perf_counter()
            try:
                with tracing.continued(self._span, [d.properties.headers for d, _ in decoded]):
                    self.batch_handler([env for _, env in decoded])
            except StoreUnavailable:
                raise
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

    def _judge(self, delivery: _Delivery) -> _Outcome | Envelope:
        """Before any handler: control messages, crash loops and undecodable bodies."""
        request_id = completed_request(delivery.properties, delivery.body)
        if request_id == "":
            why = "a replay-completed message without a request id"
            return _Outcome(delivery, dead_letter(self.topology, why))
        if request_id is not None:
            if self.healing is not None:
                self.healing.completed(request_id)
            return _Outcome(delivery, None)
        if delivery.redelivered:
            count = _redeliveries(delivery.properties)
            if count >= MAX_REDELIVERIES:
                why = (
                    f"delivered {count + 1} times without being settled: it stops or kills "
                    "its consumer"
                )
                return _Outcome(delivery, dead_letter(self.topology, why))
        try:
            return decode(delivery.body)
        except DecodeError as exc:
            return _Outcome(
                delivery, decide(self.topology, delivery.properties, exc, permanent=True)
            )

    def _apply_one(self, delivery: _Delivery, envelope: Envelope) -> _Outcome:
        with (
            bound(envelope.correlation_id),
            tracing.continued(self._span, [delivery.properties.headers]),
        ):
            return self._apply_bound(delivery, envelope)

    @property
    def _span(self) -> str:
        return f"apply {self.topology.queue}"

    def _apply_bound(self, delivery: _Delivery, envelope: Envelope) -> _Outcome:
        started = time.perf_counter()
        try:
            self.handler(envelope)
        except StoreUnavailable:
            raise
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


def _redeliveries(properties: Any) -> int:
    """The broker's count of earlier deliveries (quorum queues' x-delivery-count), or 0."""
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    count = headers.get("x-delivery-count")
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
