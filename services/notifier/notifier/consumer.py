"""The notifier consumer: keep the user view and record e-mail intents, in one transaction.

python -m notifier.consumer runs it as a process. Sending is the sender's job (sender.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from messaging import Consumer, ConsumerSettings, Envelope, PermanentError
from messaging.replicas import AttachedBeacon
from messaging.stores import postgres_errors
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from servicekit import tracing
from servicekit.runner import configure_logging, replica_id, run_until_signalled

from .config import NotifierConfig
from .email import Composer
from .store import Intent, NotifierStore

SERVICE = "notifier"
HEARTBEAT = "notifier-consumer"  # each replica beats as notifier-consumer@<host>:<pid>
HEARTBEAT_SECONDS = 2.0


class PersonFields(BaseModel):
    """What the notifier reads of a person's data (a tolerant reader: the rest is ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    email: str | None = None
    status: str | None = None
    created_at: str = Field(description="the registration's time, which links are bound to")


# The person service's event types this view reads (its catalogue is published at
# person.localhost/asyncapi.json); an activation request also sends a new link. Any other type
# (items, a type added later) is acknowledged and counted by the runtime, never handled.
HANDLES = frozenset(
    {"person.created", "person.updated", "person.activation_requested", "person.deleted"}
)
SENDS_ACTIVATION = "person.activation_requested"


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
        people = [e for e in envelopes if e.event_type in HANDLES]
        if not people:
            return
        # One event is one statement, its own transaction; several go out in one pipeline.
        with (
            postgres_errors(),
            self.store.single_statement()
            if len(people) == 1
            else self.store.transaction(pipelined=True) as cur,
        ):
            for envelope in people:
                self._apply(cur, envelope)

    def _apply(self, cur: psycopg.Cursor, envelope: Envelope) -> None:
        """Queue the statement of one event; its result is not read."""
        person = _fields(envelope)
        state = None if person is None else {**envelope.data, **person.model_dump()}
        mail = person is not None and bool(person.email)
        # The welcome is composed for every event with an e-mail, whether or not it turns out to
        # call for one (the SQL decides): the price of deciding without a round trip. An
        # activation request carries it too, for when it is applied before the registration.
        welcome = self._intent("welcome", envelope.entity_id, person) if mail else None
        activation = None
        if mail and envelope.event_type == SENDS_ACTIVATION:
            activation = self._intent("activation", envelope.entity_id, person)
        self.store.apply_person(
            cur,
            envelope.event_id,
            envelope.entity_id,
            envelope.entity_version,
            state,
            welcome,
            activation,
        )

    def _intent(self, kind: str, cpf: str, person: PersonFields) -> Intent:
        mail = self.composer.compose(kind, cpf, person.name, person.email, person.created_at)
        return Intent(person.email, mail.subject, mail.html, mail.text)


def _fields(envelope: Envelope) -> PersonFields | None:
    if envelope.data is None:
        return None
    try:
        return PersonFields.model_validate(envelope.data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PermanentError(f"person data: {reasons[:300]}") from None


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
        probe=store.consumer_probe,
        handles=HANDLES,
    )
    return consumer, store


def main() -> int:
    config = NotifierConfig()
    configure_logging(config.log_level)
    tracing.configure("notifier-consumer")
    with ConnectionPool(config.notifier_database_url, min_size=1, max_size=3, timeout=5) as pool:
        consumer, store = build(config, pool)
        name = f"{HEARTBEAT}@{replica_id()}"
        heartbeat = AttachedBeacon(
            consumer,
            lambda: store.beat(
                name, {**consumer.stats.snapshot(), "health": consumer.health() or "ok"}
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
