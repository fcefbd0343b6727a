"""The e-mail sender: deliver pending e-mails, apart from consuming. python -m notifier.sender.

Each delivery is claimed (status 'sending', committed) before SendGrid is called, so two senders
never send the same e-mail and a crash before the call is retried after the lease. The one window
that can still duplicate an e-mail: the sender dies after SendGrid accepted it and before the
'sent' mark commits (the duration of one local UPDATE, milliseconds); after the lease the
delivery is sent again. A database blip in that window does not duplicate: the mark is retried
on a fresh connection (see `_record`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import psycopg
from messaging.connection import Backoff
from messaging.runner import configure_logging, run_until_signalled
from psycopg_pool import ConnectionPool

from .config import NotifierConfig
from .email import Outcome, SendGridTransport, backoff_seconds
from .store import NotifierStore

log = logging.getLogger("notifier.sender")
BATCH = 20


class Transport(Protocol):
    name: str

    def send(self, delivery: dict[str, Any]) -> Outcome: ...


class Sender:
    def __init__(
        self, store: NotifierStore, config: NotifierConfig, transport: Transport | None
    ) -> None:
        self.store, self.config, self.transport = store, config, transport
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.sent = self.failed = 0

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        listener = threading.Thread(target=self._listen, name="deliveries-listener", daemon=True)
        listener.start()
        backoff = Backoff(cap=10.0)
        while not self._stop.is_set():
            try:
                pause = self.run_once()
                backoff.reset()
            except psycopg.Error as exc:
                pause = backoff.next()
                log.warning("sender lost the database (%s); retrying in %.1fs", exc, pause)
            if pause > 0:
                self._wake.wait(pause)
                self._wake.clear()
        listener.join(timeout=2)

    def run_once(self) -> float:
        """Deliver what is due; return how long to wait before looking again."""
        claimed = self.store.claim_due(BATCH, self.config.sender_lease_seconds)
        for delivery in claimed:
            wait = self._deliver(delivery)
            if wait:  # rate limited: the whole account waits, not just this e-mail
                return wait
            if self._stop.is_set():
                return 0
        if len(claimed) == BATCH:
            return 0
        due = self.store.next_due_in()
        return min(self.config.sender_poll_seconds, due if due is not None else 3600)

    def _deliver(self, delivery: dict[str, Any]) -> float:
        if self.transport is None:
            self.store.deliver_to_mailbox(delivery, self.config.email_from)
            self.sent += 1
            return 0.0
        outcome = self.transport.send(delivery)
        if outcome.status == "sent":
            name, message_id = self.transport.name, outcome.message_id
            self._record(lambda: self.store.mark_sent(delivery["id"], name, message_id))
            self.sent += 1
        elif outcome.status == "retry" and delivery["attempts"] < self.config.sender_max_attempts:
            wait = (
                outcome.retry_after
                if outcome.retry_after is not None
                else backoff_seconds(delivery["attempts"])
            )
            self._record(lambda: self.store.mark_retry(delivery["id"], wait, outcome.detail))
            log.warning("delivery %s to retry in %.1fs: %s", delivery["id"], wait, outcome.detail)
            return wait if outcome.retry_after is not None else 0.0
        else:
            self._record(lambda: self.store.mark_failed(delivery["id"], outcome.detail))
            self.failed += 1
            log.error("delivery %s failed: %s", delivery["id"], outcome.detail)
        return 0.0

    def _record(self, action: Callable[[], None]) -> None:
        """Record what SendGrid answered, riding out database blips.

        An accepted e-mail whose 'sent' mark is lost would be sent again once its lease expires,
        so a failed mark is retried on a fresh connection for up to half the lease (also while
        stopping) before the error is let through.
        """
        backoff = Backoff(first=0.05, cap=1.0)
        deadline = time.monotonic() + self.config.sender_lease_seconds / 2
        while True:
            try:
                action()
                return
            except psycopg.Error as exc:
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
                            self._wake.set()
            except psycopg.Error:
                self._stop.wait(1.0)


def transport_for(config: NotifierConfig) -> Transport | None:
    """SendGrid when an API key is set; None means the development mailbox."""
    if not config.sendgrid_api_key:
        return None
    return SendGridTransport(
        config.sendgrid_api_key,
        config.sendgrid_host,
        config.email_from,
        config.sendgrid_timeout_seconds,
    )


def main() -> int:
    config = NotifierConfig()
    configure_logging(config.log_level)
    with ConnectionPool(config.notifier_database_url, min_size=1, max_size=2) as pool:
        transport = transport_for(config)
        log.info("sending e-mail through %s", transport.name if transport else "the mailbox")
        return run_until_signalled(Sender(NotifierStore(pool), config, transport))


if __name__ == "__main__":
    raise SystemExit(main())
