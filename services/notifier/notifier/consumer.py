"""The notifier consumer: keep the user view and record e-mail intents, in one transaction.

python -m notifier.consumer runs it as a process. Sending is the sender's job (sender.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from messaging import Consumer, ConsumerSettings, Envelope, PermanentError
from messaging.runner import AttachedBeacon, configure_logging, run_until_signalled
from psycopg_pool import ConnectionPool

from .config import NotifierConfig
from .email import Composer
from .store import Intent, NotifierStore, translated

SERVICE = "notifier"
HEARTBEAT = "notifier-consumer"
HEARTBEAT_SECONDS = 2.0


class UserView:
    """Handler: apply a person event to the view; decide which e-mail it calls for."""

    def __init__(self, store: NotifierStore, composer: Composer) -> None:
        self.store, self.composer = store, composer

    def __call__(self, envelope: Envelope) -> None:
        self.batch([envelope])

    def batch(self, envelopes: Sequence[Envelope]) -> None:
        """Apply the events in order in one transaction: all of them or none.

        A batch that fails is rolled back; the runtime then applies its events one by one, so
        one bad event is retried or dead-lettered alone.
        """
        people = [e for e in envelopes if e.entity == "person"]  # items do not concern us
        if not people:
            return
        with translated(), self.store.transaction(pipelined=True) as cur:
            for envelope in people:
                self._apply(cur, envelope)

    def _apply(self, cur: psycopg.Cursor, envelope: Envelope) -> None:
        """Queue the statements of one event; none of their results is read."""
        cpf, state = envelope.entity_id, envelope.data
        if state is not None:
            _check(state)
        mail = state is not None and bool(state.get("email"))
        # The welcome is composed for every event with an e-mail, whether or not it turns out to
        # call for one (the SQL decides): the price of deciding without a round trip. An
        # activation request carries it too, for when it is applied before the registration.
        welcome = self._intent("welcome", envelope) if mail else None
        activation = None
        if mail and envelope.change == "activation_requested":
            activation = self._intent("activation", envelope)
        self.store.apply_person(
            cur, envelope.event_id, cpf, envelope.entity_version, state, welcome, activation
        )

    def _intent(self, kind: str, envelope: Envelope) -> Intent:
        state = envelope.data
        mail = self.composer.compose(
            kind, envelope.entity_id, state["name"], state["email"], state["created_at"]
        )
        return Intent(state["email"], mail.subject, mail.html, mail.text)


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
    store = NotifierStore(pool, config.emails_per_address_per_day)
    view = UserView(store, composer_for(config))
    consumer = Consumer(
        ConsumerSettings(config.amqp_url, config.topology(SERVICE)),
        view,
        batch_handler=view.batch,
        probe=store.ping,
    )
    return consumer, store


def main() -> int:
    config = NotifierConfig()
    configure_logging(config.log_level)
    with ConnectionPool(config.notifier_database_url, min_size=1, max_size=3, timeout=5) as pool:
        consumer, store = build(config, pool)
        heartbeat = AttachedBeacon(
            consumer,
            lambda: store.beat(
                HEARTBEAT, {**consumer.stats.snapshot(), "health": consumer.health() or "ok"}
            ),
            every=HEARTBEAT_SECONDS,
        )
        heartbeat.start()
        try:
            return run_until_signalled(consumer)
        finally:
            heartbeat.stop()


if __name__ == "__main__":
    raise SystemExit(main())
