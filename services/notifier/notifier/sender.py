"""The e-mail sender: deliver pending e-mails, apart from consuming. python -m notifier.sender.

Each delivery is claimed (status 'sending', committed) before SendGrid is called, so two senders
never send the same e-mail and a crash before the call is retried after the lease. The one window
that can still duplicate an e-mail: the sender dies after SendGrid accepted it and before the
'sent' mark commits (the duration of one local UPDATE, milliseconds); after the lease the
delivery is sent again. A database blip in that window does not duplicate: the mark is retried
on a fresh connection (see `_record`). A result is recorded only by the claim that is still
current, so a worker whose lease ran out cannot undo another worker's `sent`.

No exception ends a worker: an unforeseen error from the transport is one attempt with its
reason, and one anywhere else is logged and the loop goes on. The sender reports its liveness
(every worker alive, none stuck in one call) to the notifier's /ready through a heartbeat row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import psycopg
from messaging.connection import Backoff
from opentelemetry.trace import SpanKind
from psycopg_pool import ConnectionPool
from servicekit import tracing
from servicekit.database import connection_pool
from servicekit.retention import Pruner
from servicekit.runner import configure_logging, replica_id, run_until_signalled

from . import retention
from .config import NotifierConfig
from .email import Outcome, SendGridTransport, backoff_seconds, composer_for, tls_context
from .store import NotifierStore

log = logging.getLogger("notifier.sender")


class Transport(Protocol):
    name: str

    def send(self, delivery: dict[str, Any]) -> Outcome: ...


RECORD_AFTER_STOP_SECONDS = 10.0  # a stopping sender's last tries to record a result
MAILBOX_BATCH = 100  # e-mails put in the development mailbox per statement
# Most claims one SendGrid worker takes in one statement, when there is a backlog. A hanging
# call holds back the rest of its worker's batch for at most the timeout (then they are sent, or
# given back if the lease would not outlast a call).
CLAIM_BATCH = 16
HEARTBEAT = "notifier-sender"  # each replica beats as notifier-sender@<host>:<pid>
HEARTBEAT_SECONDS = 2.0


class Sender:
    """SENDER_CONCURRENCY workers, each claiming due deliveries in one statement and sending
    them one after the other: one at a time while the e-mails come one by one, a batch (up to
    CLAIM_BATCH, doubling while each claim comes back full) while there is a backlog.

    A slow or hanging call to SendGrid holds back only its own worker and the rest of its batch,
    and a claim is sent only while its lease outlasts the call (the lease must outlast two
    SENDGRID_TIMEOUT_SECONDS; the configuration checks): a batch's late claims are given back.
    Workers sleep until a delivery is recorded (LISTEN) or one falls due; polling is the fallback.
    A worker woken from sleep by a recorded delivery lingers SENDER_LINGER_SECONDS first, so the
    e-mails of a burst share one mailbox statement, or the workers woken together.
    """

    def __init__(
        self, store: NotifierStore, config: NotifierConfig, transport: Transport | None
    ) -> None:
        self.store, self.config, self.transport = store, config, transport
        self.composer = composer_for(config)  # e-mails are composed as they go out
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._wakes = 0  # counts wake-ups, so one that comes while a worker looks is not lost
        self.workers: list[threading.Thread] = []
        self._calls: dict[str, float] = {}  # worker name -> when its current call began
        # Deliveries whose answer from SendGrid is not recorded yet: never claimed again here.
        self._unmarked: set[int] = set()
        self._unmarked_lock = threading.Lock()
        self.heartbeat = f"{HEARTBEAT}@{replica_id()}"
        self._batch: dict[str, int] = {}  # worker name -> how many it claims next

    def stop(self) -> None:
        self._stop.set()
        self.wake()

    def wake(self) -> None:
        with self._wake:
            self._wakes += 1
            self._wake.notify_all()

    def run(self) -> None:
        listener = threading.Thread(target=self._listen, name="deliveries-listener", daemon=True)
        listener.start()
        # The development mailbox is one local INSERT: a single worker is plenty.
        count = self.config.sender_concurrency if self.transport is not None else 1
        self.workers = [
            threading.Thread(target=self._work, name=f"sender-{n}", daemon=True)
            for n in range(count)
        ]
        beacon = threading.Thread(target=self._report, name="sender-beacon", daemon=True)
        beacon.start()
        for worker in self.workers:
            worker.start()
        for worker in self.workers:
            worker.join()
        listener.join(timeout=2)

    def health(self) -> str | None:
        """None while every worker is alive and none is stuck in one call; else why not."""
        dead = [w.name for w in self.workers if not w.is_alive()]
        if dead and not self._stop.is_set():
            return f"sender workers not running: {', '.join(dead)}"
        stuck_after = self.config.sendgrid_timeout_seconds * 3
        now = time.monotonic()
        stuck = [name for name, began in list(self._calls.items()) if now - began > stuck_after]
        if stuck:
            return f"sender workers stuck in a call for over {stuck_after:.0f}s: {len(stuck)}"
        return None

    def _report(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.beat(self.heartbeat, {"health": self.health() or "ok"})
            except Exception as exc:  # readiness reports the missing beat
                log.warning("sender heartbeat failed: %s", exc)
            self._stop.wait(HEARTBEAT_SECONDS)

    def _work(self) -> None:
        backoff = Backoff(cap=10.0)
        while not self._stop.is_set():
            seen = self._wakes
            try:
                pause = self._step()
                backoff.reset()
            except psycopg.Error as exc:
                pause = backoff.next()
                log.warning("sender lost the database (%s); retrying in %.1fs", exc, pause)
            except Exception:  # a bug of ours: log it, keep the worker
                pause = backoff.next()
                log.exception("sender worker failed; going on in %.1fs", pause)
            if pause > 0 and not self._stop.is_set():
                with self._wake:
                    idle = self._wakes == seen
                    if idle:
                        self._wake.wait(pause)
                    woken = idle and self._wakes != seen
                # Woken from idleness by a recorded delivery: the linger lets the ones recorded
                # right after it come along in the same statement (a stop ends it at once).
                if woken and self.config.sender_linger_seconds > 0:
                    self._stop.wait(self.config.sender_linger_seconds)

    def _step(self) -> float:
        """Deliver due e-mail; return how long to wait before looking again (0: at once)."""
        if self.transport is None:
            if self._to_mailbox() == MAILBOX_BATCH:  # a full batch: more may be due at once
                return 0.0
        else:
            with self._unmarked_lock:
                busy = set(self._unmarked)
            began = time.monotonic()
            limit = self._batch.get(threading.current_thread().name, 1)
            claimed = self.store.claim_due(limit, self.config.sender_lease_seconds, busy)
            # A full batch means a backlog: the next one doubles, up to CLAIM_BATCH; anything
            # less starts again from one, so a few e-mails spread over all the workers.
            self._batch[threading.current_thread().name] = (
                min(2 * limit, CLAIM_BATCH) if len(claimed) == limit else 1
            )
            if claimed:
                self._deliver_batch(claimed, began)
                return 0.0
        due = self.store.next_due_in()
        return max(0.01, min(self.config.sender_poll_seconds, due if due is not None else 3600))

    def _deliver_batch(self, claimed: list[dict[str, Any]], claimed_at: float) -> None:
        """Send a batch of claims one after the other. The first goes at once, as a claim of one
        would; each later one only while its lease still outlasts two SendGrid timeouts, the
        margin the first has (NotifierConfig checks the lease against it). The rest, or all that
        is left once the sender is stopping, is given back at once (pending, the attempt not
        counted)."""
        lease, timeout = self.config.sender_lease_seconds, self.config.sendgrid_timeout_seconds
        for n, delivery in enumerate(claimed):
            late = n > 0 and time.monotonic() - claimed_at + 2 * timeout >= lease
            if late or self._stop.is_set():
                rest = claimed[n:]
                try:
                    self.store.give_back(rest)
                except psycopg.Error as exc:  # the lease hands them over all the same
                    log.warning("could not give back %d claims (%s)", len(rest), exc)
                return
            self._deliver(delivery)

    def _deliver(self, delivery: dict[str, Any]) -> None:
        with tracing.continued("send e-mail", [delivery.get("trace_context")], SpanKind.CLIENT):
            self._deliver_traced(delivery)

    def _to_mailbox(self) -> int:
        """The development mailbox: due e-mails in batches, one transaction each (no call leaves
        the database, so there is nothing to claim first). Returns how many it delivered."""
        started = time.time_ns()
        delivered = self.store.deliver_due_to_mailbox(
            MAILBOX_BATCH,
            self.config.sender_lease_seconds,
            self.config.email_from,
            self.composer.for_delivery,
        )
        for delivery in delivered:  # each e-mail's span, in the trace of its registration
            tracing.record("send e-mail", delivery["trace_context"], started)
        return len(delivered)

    def _deliver_traced(self, delivery: dict[str, Any]) -> None:
        with self._unmarked_lock:
            self._unmarked.add(delivery["id"])
        try:
            self._deliver_claimed(delivery)
        finally:
            with self._unmarked_lock:
                self._unmarked.discard(delivery["id"])

    def _deliver_claimed(self, delivery: dict[str, Any]) -> None:
        try:
            mail = self.composer.for_delivery(delivery)
        except Exception as exc:  # pure work that will not pass on a retry: fail it, with why
            log.error("delivery %s could not be composed", delivery["id"], exc_info=True)
            why = f"could not compose the e-mail: {type(exc).__name__}: {exc}"[:2000]
            self._record(lambda: self.store.mark_failed(delivery, why))
            return
        outcome = self._send(
            {**delivery, "subject": mail.subject, "html": mail.html, "text": mail.text}
        )
        if outcome.status == "sent":
            name, message_id = self.transport.name, outcome.message_id
            self._record(lambda: self.store.mark_sent(delivery, name, message_id))
        elif outcome.status == "retry" and outcome.retry_after is not None:
            # Rate limited: this e-mail waits until X-RateLimit-Reset, and it is not one of its
            # attempts. Other workers learn of the limit from their own next call (one wasted
            # request each per window), rather than from a guess shared between processes.
            wait = outcome.retry_after
            self._record(
                lambda: self.store.mark_retry(delivery, wait, outcome.detail, counts=False)
            )
            log.warning("rate limited; delivery %s again in %.1fs", delivery["id"], wait)
        elif outcome.status == "retry" and delivery["attempts"] < self.config.sender_max_attempts:
            wait = backoff_seconds(delivery["attempts"], self.config.sender_backoff_cap_seconds)
            self._record(lambda: self.store.mark_retry(delivery, wait, outcome.detail))
            log.warning("delivery %s to retry in %.1fs: %s", delivery["id"], wait, outcome.detail)
        else:
            self._record(lambda: self.store.mark_failed(delivery, outcome.detail))
            log.error("delivery %s failed: %s", delivery["id"], outcome.detail)

    def _send(self, delivery: dict[str, Any]) -> Outcome:
        """One call to the transport; whatever it raises is an attempt that failed, with why."""
        me = threading.current_thread().name
        self._calls[me] = time.monotonic()
        try:
            return self.transport.send(delivery)
        except Exception as exc:
            log.warning("delivery %s: the transport raised", delivery["id"], exc_info=True)
            return Outcome("retry", f"{type(exc).__name__}: {exc}"[:2000])
        finally:
            self._calls.pop(me, None)

    def _record(self, action: Callable[[], bool]) -> None:
        """Record what SendGrid answered, riding out database outages however long.

        An accepted e-mail whose 'sent' mark is lost would be sent again once its lease expires,
        so a failed mark is retried on a fresh connection for as long as the process runs (the
        delivery is meanwhile never claimed again by this process), and after a stop for up to
        `RECORD_AFTER_STOP_SECONDS` before the error is let through (the documented window).
        """
        backoff = Backoff(first=0.05, cap=1.0)
        deadline: float | None = None
        while True:
            try:
                if not action():
                    log.warning("a delivery's claim was taken over meanwhile: result not recorded")
                return
            except psycopg.Error as exc:
                if self._stop.is_set():
                    deadline = deadline or time.monotonic() + RECORD_AFTER_STOP_SECONDS
                    if time.monotonic() >= deadline:
                        raise
                pause = backoff.next()
                log.warning("could not record a delivery outcome (%s); again in %.2fs", exc, pause)
                time.sleep(pause)

    def _listen(self) -> None:
        """Wake the loop when a delivery is recorded (LISTEN); polling is the fallback."""
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.config.notifier_database_url, autocommit=True) as conn:
                    conn.execute("LISTEN deliveries")
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5):
                            self.wake()
            except psycopg.Error:
                self._stop.wait(1.0)


def transport_for(config: NotifierConfig) -> Transport | None:
    """SendGrid when an API key is set, one connection per worker; None means the development
    mailbox."""
    if not config.sendgrid_api_key:
        return None
    return SendGridTransport(
        config.sendgrid_api_key,
        config.sendgrid_host,
        config.email_from,
        config.sendgrid_timeout_seconds,
        tls_context(config.sendgrid_ca_file),
        connections=config.sender_concurrency,
    )


def pruner(pool: ConnectionPool, config: NotifierConfig) -> Pruner:
    """The notifier's retention (retention.py), pruned on the sender's pool."""
    return Pruner(
        pool.connection,
        retention.rules(config),
        config.retention_interval_seconds,
        config.retention_batch,
    )


def main() -> int:
    config = NotifierConfig()
    configure_logging(config.log_level)
    tracing.configure("notifier-sender")
    pool_size = config.sender_concurrency + 2  # the workers, the heartbeat, the retention
    pool = connection_pool(config.notifier_database_url, "notifier-sender", pool_size, timeout=30)
    with pool:
        transport = transport_for(config)
        log.info("sending e-mail through %s", transport.name if transport else "the mailbox")
        pruner(pool, config).start()  # beside the sending, in this long-running process
        return run_until_signalled(Sender(NotifierStore(pool), config, transport))


if __name__ == "__main__":
    raise SystemExit(main())
