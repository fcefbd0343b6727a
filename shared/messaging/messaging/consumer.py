"""Consumer runtime: deliver envelopes to a handler, ack only after it committed.

The pika connection lives on the thread that calls run(); handlers run on a worker thread, so
heartbeats keep flowing during a long handler. Outcomes go back to the I/O thread, which
publishes retry or dead copies with confirms before acknowledging the original: a crash in
between can duplicate a message (the handlers are idempotent) but never lose one.

Nothing a message carries can end the worker: a message whose headers cannot be judged is
dead-lettered with the reason, an exception anywhere in judging or settling is contained, and
the I/O thread starts a new worker if one ever dies. A handler's failure of any class, even
SystemExit, is its message's failure (retried, then dead-lettered). A batch a worker failed on
otherwise is never settled by a later acknowledgement: the channel is closed, so the broker
gives it back.

What happens to each message, apart from the broker (the event types let through, validation,
dispatch, retries and dead letters), is decided by a `Processor` (processing.py) from the
consumer's declared `Handlers` (handlers.py): the in-memory broker of the tests uses the same.

A handler whose store does not answer, or answers but refuses writes, raises StoreUnavailable:
that is no message's fault. The runtime then *holds* what it has in hand (prefetch bounds it; the
broker sends no more), so no delivery is counted against the limit, waits with exponential
backoff, and applies the held batch again once `probe()` passes (the probe should prove a
write; without one, the held batch itself is the probe). Pausing never cancels the
subscription, so there is no resume to lose. A pause longer than `hold_limit` (below the
broker's consumer timeout, 30 minutes by default, after which it would take the deliveries back
and count them) republishes what is held to the work queue, confirmed, and acknowledges the
originals: a new copy whose count starts again. `health()` says whether messages are being
applied, or why not; the process's beacon reports it to /ready.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from .connection import HEARTBEAT_SECONDS, Backoff, StopFlag, connect
from .envelope import Envelope
from .errors import StoreUnavailable
from .handlers import Handlers
from .healing import READY, Healing
from .processing import (
    HANDLER_BUCKETS,
    MAX_REDELIVERIES,
    Apply,
    ConsumerStats,
    Outcome,
    Processor,
)
from .retry import Decision, resent_properties
from .topology import Topology
from .verification import Verification

__all__ = ["HANDLER_BUCKETS", "Consumer", "ConsumerSettings", "ConsumerStats"]

log = logging.getLogger("messaging.consumer")


@dataclass(frozen=True)
class ConsumerSettings:
    """How a consumer reaches its queues, and how it batches, pauses and stops.

    `amqp_url` lists the broker's nodes (comma-separated); `topology` names the queues
    (`BrokerSettings.topology(service)`). Up to `prefetch` deliveries are in hand, applied in
    batches of up to `max_batch`; a batch that is not full waits up to `linger` seconds after
    its first delivery is taken, for more (fewer transactions, acks and thread wake-ups when
    events come one at a time; 0: what is there goes at once). `stall_after` seconds with
    messages waiting and nothing settled make it unhealthy; a store outage holds what it has for
    up to `hold_limit` seconds, retried with a backoff of at most `pause_backoff_cap`, then gives
    it back as confirmed copies; a message delivered `max_redeliveries` times is dead-lettered
    before it is handled. On stop it finishes what it holds within `shutdown_timeout` seconds; it
    looks at the healing marker every `heal_every` seconds.
    """

    amqp_url: str
    topology: Topology
    prefetch: int = 1000
    max_batch: int = 500
    linger: float = 0.0
    shutdown_timeout: float = 10.0
    stall_after: float = 60.0  # messages waiting this long with nothing settled: not healthy
    heartbeat: int = HEARTBEAT_SECONDS
    hold_limit: float = 900.0  # a pause this long gives back what it holds (module docstring)
    max_redeliveries: int = MAX_REDELIVERIES
    heal_every: float = 2.0  # seconds between two looks at the healing marker
    pause_backoff_cap: float = 30.0  # the longest wait between two tries of a held batch

    def __post_init__(self) -> None:
        if not (self.linger >= 0 and math.isfinite(self.linger)):  # NaN would spin the worker
            raise ValueError(f"linger must be a finite number of seconds, not {self.linger!r}")


@dataclass(frozen=True)
class _Delivery:
    lease: int  # the channel lease it came on: a closed channel or a pause ends a lease
    tag: int
    redelivered: bool
    properties: Any
    body: bytes


class _Broken(pika.exceptions.AMQPError):
    """The session cannot go on (a settle failed): reconnect; unacked messages come back."""


class Consumer:
    """Consume one service's work queue until stop(); reconnects after any broker failure."""

    # The header of a copy sent back to its own queue that the broker would count with.
    _COUNTED = "x-delivery-count"

    def __init__(
        self,
        settings: ConsumerSettings,
        handlers: Handlers | Callable[[Envelope], None],
        apply: Apply | None = None,
        *,
        probe: Callable[[], None] | None = None,
        healing: Healing | None = None,
        verification: Verification | None = None,
    ) -> None:
        self.settings = settings
        self.topology = settings.topology
        if not isinstance(handlers, Handlers):  # one function for every event type
            handlers = Handlers.every(handlers)
        self.processor = Processor(
            settings.topology,
            handlers,
            apply,
            healing=healing,
            verification=verification,
            max_redeliveries=settings.max_redeliveries,
        )
        self.probe = probe
        self.healing = healing
        self.verification = verification
        self.stats = self.processor.stats
        self.attached = threading.Event()
        self.paused = threading.Event()  # the store is away or refuses writes: holding
        self._pause_reason = ""
        self._held: list[_Delivery] = []  # the batch a pause holds, applied again after it
        self._held_since = 0.0
        self._pause_backoff = Backoff(first=0.5, cap=settings.pause_backoff_cap)
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

    @property
    def healing_state(self) -> str:
        """The model's rebuild state as this process last saw it (healing.py)."""
        return self.healing.state if self.healing is not None else READY

    def health(self) -> str | None:
        """None while messages are being applied; otherwise why not."""
        worker = self._worker
        if worker is None or not worker.is_alive():
            return "the consumer's worker is not running"
        if self.paused.is_set():
            return f"paused: {self._pause_reason}"
        waiting = self._inbox.qsize() + (1 if self._busy.is_set() else 0)
        idle_for = time.monotonic() - self._progress_at
        if waiting and idle_for > self.settings.stall_after:
            return f"stalled: messages wait and nothing was settled for {idle_for:.0f}s"
        return None

    def report(self) -> str:
        """What a replica reports (its beacon, /ready): `ok`, why it is not healthy, or the
        read model's rebuild state (`rebuilding`, `wiping`) while it heals."""
        return self.health() or (self.healing_state if self.healing_state != READY else "ok")

    def run(self) -> None:
        self._start_worker()
        if self.healing is not None or self.verification is not None:
            threading.Thread(target=self._keep, name="consumer-keeping", daemon=True).start()
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                self._session()
                backoff.reset()
            except Exception as exc:  # nothing ends the consumer: reconnect after a backoff
                self.attached.clear()
                delay = backoff.next()
                foreseen = isinstance(exc, pika.exceptions.AMQPError | OSError)
                log.warning(
                    "consumer %s lost the broker (%s: %s); reconnecting in %.1fs",
                    self.topology.queue,
                    type(exc).__name__,
                    exc,
                    delay,
                    exc_info=not foreseen,
                )
                self._stop.wait(delay)
        if self._worker is not None:
            self._worker.join(timeout=self.settings.shutdown_timeout)
        log.info("consumer %s stopped", self.topology.queue)

    def _keep(self) -> None:
        """While attached, every few seconds: look at the model's generation marker (a store that
        lost its data asks the producer for a replay, healing.py), and when a verification is
        due ask for the producer's digests (verification.py)."""
        while not self._stop.is_set():
            if self.attached.wait(timeout=1.0):
                try:
                    if self.healing is not None:
                        self.healing.check()
                    # A model being rebuilt differs everywhere, and the rebuild mends it.
                    if (
                        self.verification is not None
                        and self.healing_state == READY
                        and self.verification.due()
                    ):
                        self.verification.ask()
                except Exception as exc:  # the store or the broker blinked: the next look
                    log.warning("housekeeping of %s failed: %s", self.topology.queue, exc)
                self._stop.wait(self.settings.heal_every)

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
            self._consume()
            self.attached.set()
            log.info("consumer attached to %s", self.topology.queue)
            while not self._stop.is_set():
                conn.process_data_events(time_limit=0.2)
                if not self._stop.is_set() and not (self._worker and self._worker.is_alive()):
                    # What it held was never applied: the broker must give it back, and no
                    # later acknowledgement (they are cumulative) may settle it.
                    log.critical("the consumer's worker died; starting a new one")
                    self._start_worker()
                    raise _Broken("the worker died holding messages")
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

    def _give_back(self, held: list[_Delivery]) -> None:
        """Runs on the I/O thread: a long pause returns what it holds without the broker
        counting a delivery: a confirmed copy to the work queue, then the originals acked."""
        held = [d for d in held if d.lease == self._lease]
        if not held:
            return
        try:
            for delivery in held:
                props = delivery.properties
                headers = props.headers if isinstance(props.headers, dict) else {}
                self._publisher.basic_publish(
                    exchange="",
                    routing_key=self.topology.queue,
                    body=delivery.body,
                    properties=resent_properties(
                        props, {k: v for k, v in headers.items() if k != self._COUNTED}
                    ),
                    mandatory=True,
                )
            self._channel.basic_ack(max(d.tag for d in held), multiple=True)
        except pika.exceptions.AMQPError:
            raise
        except Exception as exc:
            raise _Broken(f"giving back held messages failed: {type(exc).__name__}") from exc
        log.info(
            "gave %d held message(s) back to %s during a long pause", len(held), self.topology.queue
        )

    def _break(self) -> None:
        raise _Broken("a worker failed on a batch: it goes back to the queue")

    def _settle(self, outcomes: list[Outcome]) -> None:
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
            except Exception:  # a bug of ours: never let a later ack settle the dropped batch
                log.exception("consumer worker failed on a batch; it returns to the queue")
                self._held = []
                self._busy.clear()
                self._post(self._break)

    def _work_once(self) -> None:
        if self._stop.is_set():  # stopping: what is in hand stays unacked, the broker returns it
            self._held = []
            with contextlib.suppress(queue.Empty):
                while True:
                    self._inbox.get_nowait()
            self._busy.clear()
            return
        batch = [d for d in self._held if d.lease == self._lease] or self._next_batch()
        self._held = []
        if not batch:
            if self.paused.is_set():
                self._idle_while_paused()
            elif self.processor.verifying:
                self.processor.verify_step()  # idle: the check goes on
            return
        lease = batch[0].lease
        self._busy.set()
        if self._stop.is_set() and self._conn is None:
            # The session is over: nothing applied now could be acked, and the broker gives
            # these deliveries to another consumer. Leave them unapplied.
            self._busy.clear()
            return
        try:
            outcomes = self.processor.process(batch)
        except StoreUnavailable as exc:
            self._held = batch
            self._pause(exc, lease)
            return
        if self.paused.is_set():
            self._resumed()
        self._pause_backoff.reset()
        if not self._post(lambda o=outcomes: self._settle(o)):
            self._busy.clear()
        if self.processor.verifying:  # one part of a check under way between two batches
            self.processor.verify_step()

    def _next_batch(self) -> list[_Delivery]:
        try:  # a check under way goes on while nothing comes: no wait then
            first = self._inbox.get(timeout=0.001 if self.processor.verifying else 0.2)
        except queue.Empty:
            if not self._busy.is_set():
                self._progress_at = time.monotonic()  # idle is not stalled
            return []
        # In hand from now on: a stop waits for this batch to be settled (_drain), even while it
        # lingers; applied after the session closed, it could not be acked and would come back.
        self._busy.set()
        batch = [first]
        deadline = time.monotonic() + self.settings.linger
        while len(batch) < self.settings.max_batch:
            try:
                batch.append(self._inbox.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                break
            try:  # a batch that is not full waits a little for more (settings.linger)
                batch.append(self._inbox.get(timeout=min(left, 0.2)))  # stop is looked at
            except queue.Empty:
                continue
        lease = self._lease  # read after the wait: a session may have started meanwhile
        batch = [d for d in batch if d.lease == lease]
        if not batch:
            self._busy.clear()
        return batch

    def _pause(self, exc: StoreUnavailable, lease: int) -> None:
        """Hold the batch, wait (longer each time the first batch after a pause fails again),
        then wait for the probe; the caller applies the held batch again afterwards."""
        self._pause_reason = f"the store is away or refuses writes ({exc})"[:300]
        if not self.paused.is_set():
            self.paused.set()
            self._held_since = time.monotonic()
            self.stats.paused += 1
            log.warning("%s: %s; pausing", self.topology.queue, self._pause_reason)
        delay = self._pause_backoff.next()
        if self._wait_holding(delay, lease):
            return
        probe_backoff = Backoff(first=0.5, cap=self.settings.pause_backoff_cap)
        while self.probe is not None and not self._stop.is_set() and self._lease == lease:
            try:
                self.probe()
                return
            except Exception as again:
                self._pause_reason = f"the store is away or refuses writes ({again})"[:300]
                delay = probe_backoff.next()
                log.info(
                    "store of %s still away (%s); probing in %.1fs",
                    self.topology.queue,
                    again,
                    delay,
                )
                if self._wait_holding(delay, lease):
                    return

    def _wait_holding(self, seconds: float, lease: int) -> bool:
        """Wait while holding; give the held messages back if the pause grew too long. True
        when waiting is over for another reason (stopping, or the channel went away)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stop.wait(min(left, 1.0)) or self._lease != lease:
                return True
            if time.monotonic() - self._held_since > self.settings.hold_limit:
                self._give_back_held(lease)
        return False

    def _give_back_held(self, lease: int) -> None:
        held = [d for d in self._held if d.lease == lease]
        while True:
            try:
                held.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        self._held = []
        self._held_since = time.monotonic()
        self._busy.clear()
        if held and not self._post(lambda h=held: self._give_back(h)):
            return  # no connection: the broker has them back already

    def _idle_while_paused(self) -> None:
        """Nothing held (it went back with its channel): paused only until the store answers."""
        try:
            if self.probe is not None:
                self.probe()
        except Exception as exc:
            self._pause_reason = f"the store is away or refuses writes ({exc})"[:300]
            self._stop.wait(self._pause_backoff.next())
        else:
            self._resumed()

    def _resumed(self) -> None:
        self.paused.clear()
        self._pause_reason = ""
        log.info("the store of %s answers again: consuming", self.topology.queue)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
