"""The notifier consumer: keep the user view and record e-mail intents, in one transaction.

python -m notifier.consumer runs it as a process. Sending is the sender's job (sender.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from messaging import Consumer, ConsumerSettings, Envelope, Handlers
from messaging.replicas import AttachedBeacon
from messaging.stores import postgres_errors
from messaging.verification import Verification
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from servicekit import tracing
from servicekit.database import connection_pool
from servicekit.runner import configure_logging, replica_id, run_until_signalled

from .config import NotifierConfig
from .email import (
    ACTIVATION_REQUESTED,
    KINDS,
    PERSON_CREATED,
    PERSON_UPDATED,
    registration_time,
)
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

    @field_validator("created_at")
    @classmethod
    def _a_time_with_its_zone(cls, value: str) -> str:
        # Kept as sent (the view stores it, a link is bound to it), but only a time a link can
        # be bound to: ISO 8601 with its zone, not 'infinity' or a date alone, which PostgreSQL
        # would take and no link could carry.
        registration_time(value)  # ValueError saying why not
        return value


# The person service's event types this view reads (its catalogue is published at
# person.localhost/asyncapi.json), and those a kind of e-mail is sent on (email.KINDS). Any other
# type (items, a type added later) is acknowledged and counted by the runtime, never handled.
VIEWED = (PERSON_CREATED, PERSON_UPDATED, ACTIVATION_REQUESTED)
PERSON_STATES = tuple(dict.fromkeys([*VIEWED, *(on for k in KINDS.values() for on in k.on)]))


@dataclass(frozen=True)
class UserChange:
    """One event's change of the view, with the e-mails it may call for (the SQL decides)."""

    event_id: Any
    cpf: str
    version: int
    state: dict | None  # None: the person was deleted
    mails: tuple[Intent, ...] = ()


class UserView:
    """The view's handlers (declared in `handlers`) and the store step that applies them."""

    def __init__(self, store: NotifierStore) -> None:
        self.store = store
        self.handlers = Handlers()
        self.handlers.add(PERSON_STATES, self.person_changed, data=PersonFields)
        self.handlers.add(("person.deleted",), self.person_deleted)

    def __call__(self, envelope: Envelope) -> None:
        """Apply one event now (its data validated as the runtime would)."""
        self.apply([self.handlers.translate(envelope)])

    def person_changed(self, event: Envelope, person: PersonFields) -> UserChange:
        # Each kind the event's type calls for is an intent, whether or not it turns out to be
        # sent (the SQL decides, e.g. a welcome only for a registration without one): the price
        # of deciding without a round trip. The sender composes the e-mail as it sends it.
        mails = tuple(
            Intent(name, person.email, kind.subject, person.name, kind.once)
            for name, kind in KINDS.items()
            if person.email
            and event.event_type in kind.on
            and (kind.when is None or kind.when(person))
        )
        return UserChange(
            event.event_id,
            event.entity_id,
            event.entity_version,
            {**event.data, **person.model_dump()},
            mails,
        )

    def person_deleted(self, event: Envelope, _data: None) -> UserChange:
        return UserChange(event.event_id, event.entity_id, event.entity_version, None)

    def apply(self, changes: Sequence[UserChange]) -> None:
        """Apply the changes in order in one transaction: all of them or none (the runtime then
        applies them one by one, so one bad event is retried or dead-lettered alone). One change
        is one statement, its own transaction; several go out in one pipeline."""
        with (
            postgres_errors(),
            self.store.single_statement()
            if len(changes) == 1
            else self.store.transaction(pipelined=True) as cur,
        ):
            for change in changes:
                self.store.apply_person(
                    cur, change.event_id, change.cpf, change.version, change.state, change.mails
                )


def build(config: NotifierConfig, pool: ConnectionPool) -> tuple[Consumer, NotifierStore]:
    """Composition root of the consumer process (tests pass a pool of their own database)."""
    store = NotifierStore(pool, config.emails_per_address_per_day)
    view = UserView(store)
    topology = config.topology(SERVICE)
    # the entity types the model holds, verified against the producer's digests
    verification = Verification.scheduled(config, store, topology.queue, ("person",))
    consumer = Consumer(
        ConsumerSettings(config.amqp_url, topology, linger=config.consumer_linger_seconds),
        view.handlers,
        view.apply,
        probe=store.consumer_probe,
        verification=verification,
    )
    return consumer, store


def main() -> int:
    config = NotifierConfig()
    configure_logging(config.log_level)
    tracing.configure("notifier-consumer")
    with connection_pool(config.notifier_database_url, "notifier-consumer", 3) as pool:
        consumer, store = build(config, pool)
        name = f"{HEARTBEAT}@{replica_id()}"
        heartbeat = AttachedBeacon(
            consumer,
            lambda: store.beat(name, {**consumer.stats.snapshot(), "health": consumer.report()}),
            every=HEARTBEAT_SECONDS,
        )
        heartbeat.start()
        try:
            return run_until_signalled(consumer)
        finally:
            heartbeat.stop()


if __name__ == "__main__":
    raise SystemExit(main())
