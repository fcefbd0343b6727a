"""The notifier consumer: keep the user view and record e-mail intents, in one transaction.

python -m notifier.consumer runs it as a process. Sending is the sender's job (sender.py).
"""

from __future__ import annotations

from typing import Any

import psycopg
from messaging import (
    Consumer,
    ConsumerSettings,
    Envelope,
    PermanentError,
    RetryableError,
    Topology,
)
from messaging.runner import AttachedBeacon, configure_logging, run_until_signalled
from psycopg_pool import ConnectionPool

from .config import NotifierConfig
from .email import Composer
from .store import NotifierStore

SERVICE = "notifier"
HEARTBEAT = "notifier-consumer"
HEARTBEAT_SECONDS = 2.0


class UserView:
    """Handler: apply a person event to the view; decide which e-mail it calls for."""

    def __init__(self, store: NotifierStore, composer: Composer) -> None:
        self.store, self.composer = store, composer

    def __call__(self, envelope: Envelope) -> None:
        if envelope.entity != "person":
            return  # items do not concern the notifier
        try:
            with self.store.transaction() as cur:
                self._apply(cur, envelope)
        except (psycopg.OperationalError, psycopg.errors.SerializationFailure) as exc:
            raise RetryableError(f"database: {exc}") from exc
        except psycopg.DataError as exc:
            raise PermanentError(f"the event does not fit the view: {exc}") from exc

    def _apply(self, cur: psycopg.Cursor, envelope: Envelope) -> None:
        cpf, state = envelope.entity_id, envelope.data
        if state is not None:
            _check(state)
        applied = self.store.apply_person(cur, cpf, envelope.entity_version, state)
        if state is None or not state.get("email"):
            return
        if envelope.change == "activation_requested":
            user = self.store.current_user(cur, cpf)
            if user is not None and not user["deleted"]:
                self._intend(cur, "activation", envelope, state)
        elif applied and not self.store.has_welcome(cur, cpf, state["created_at"]):
            self._intend(cur, "welcome", envelope, state)

    def _intend(self, cur: psycopg.Cursor, kind: str, envelope: Envelope, state: dict) -> None:
        mail = self.composer.compose(kind, envelope.entity_id, state["name"], state["email"])
        self.store.record_intent(
            cur,
            kind=kind,
            cpf=envelope.entity_id,
            registered_at=state["created_at"],
            event_id=envelope.event_id,
            to_email=state["email"],
            subject=mail.subject,
            html=mail.html,
            text=mail.text,
        )


def _check(state: dict[str, Any]) -> None:
    for field in ("name", "created_at"):
        if not isinstance(state.get(field), str):
            raise PermanentError(f"person data lacks {field}")
    if state.get("email") is not None and not isinstance(state["email"], str):
        raise PermanentError("person data has a non-text email")


def composer_for(config: NotifierConfig) -> Composer:
    return Composer(config.activation_secret, config.person_url, config.activation_ttl_seconds)


def build(config: NotifierConfig, pool: ConnectionPool) -> tuple[Consumer, NotifierStore]:
    """Composition root of the consumer process."""
    store = NotifierStore(pool)
    topology = Topology(SERVICE, config.events_exchange, config.retry_delays)
    consumer = Consumer(
        ConsumerSettings(config.amqp_url, topology), UserView(store, composer_for(config))
    )
    return consumer, store


def main() -> int:
    config = NotifierConfig()
    configure_logging(config.log_level)
    with ConnectionPool(config.notifier_database_url, min_size=1, max_size=3) as pool:
        consumer, store = build(config, pool)
        heartbeat = AttachedBeacon(
            consumer,
            lambda: store.beat(HEARTBEAT, consumer.stats.snapshot()),
            every=HEARTBEAT_SECONDS,
        )
        heartbeat.start()
        try:
            return run_until_signalled(consumer)
        finally:
            heartbeat.stop()


if __name__ == "__main__":
    raise SystemExit(main())
