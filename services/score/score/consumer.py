"""The score consumer: translate person-service events into version-gated read-model changes.

python -m score.consumer runs it as a process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal

import redis
from messaging import Consumer, ConsumerSettings, Envelope, PermanentError
from messaging.healing import READY, Healing
from messaging.replicas import AttachedBeacon
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from servicekit import tracing
from servicekit.runner import configure_logging, replica_id, run_until_signalled

from .config import ScoreConfig
from .scoring import KINDS
from .store import Change, ItemChange, PersonChange, ScoreStore

SERVICE = "score"
HEARTBEAT_SECONDS = 2.0
# A replica that missed this many seconds of beats is not attached (or is gone).
BEAT_TTL_SECONDS = HEARTBEAT_SECONDS * 5


class ItemFields(BaseModel):
    """What the score reads of an item's data (a tolerant reader: the rest is not its business),
    as strictly as the producer writes it."""

    model_config = ConfigDict(extra="ignore", strict=True)

    cpf: str = Field(pattern=r"^[0-9]{1,14}$")
    # The producer's numeric(17, 2) printed: at most 15 digits, then up to 2 decimals.
    value: str = Field(pattern=r"^[0-9]{1,15}(\.[0-9]{1,2})?$")


def person_change(envelope: Envelope) -> Change:
    return PersonChange(envelope.entity_id, envelope.entity_version, envelope.data is None)


def item_created(envelope: Envelope) -> Change:
    try:
        item = ItemFields.model_validate(envelope.data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PermanentError(f"{envelope.event_type} data: {reasons[:300]}") from None
    return ItemChange(
        envelope.entity_id,
        envelope.entity_version,
        False,
        item.cpf,
        envelope.entity,
        Decimal(item.value),
    )


def item_deleted(envelope: Envelope) -> Change:
    return ItemChange(envelope.entity_id, envelope.entity_version, True)


# The person service's event types this model reads, and what each becomes (its catalogue is
# published at person.localhost/asyncapi.json; tests/test_catalogue.py checks these against it).
HANDLERS: dict[str, Callable[[Envelope], Change]] = {
    "person.created": person_change,
    "person.updated": person_change,
    "person.activation_requested": person_change,
    "person.deleted": person_change,
    **{f"{kind}.created": item_created for kind in KINDS},
    **{f"{kind}.deleted": item_deleted for kind in KINDS},
}


def to_change(envelope: Envelope) -> Change:
    """The read-model change an event asks for (the runtime hands over only HANDLERS' types)."""
    return HANDLERS[envelope.event_type](envelope)


class Applier:
    """Handler for the consumer runtime: one event, or a batch in one Redis round trip."""

    def __init__(self, store: ScoreStore) -> None:
        self.store = store

    def __call__(self, envelope: Envelope) -> None:
        self.batch([envelope])

    def batch(self, envelopes: Sequence[Envelope]) -> None:
        changes = [to_change(e) for e in envelopes if e.event_type in HANDLERS]
        if changes:
            self.store.apply(changes)  # raises StoreUnavailable or RetryableError


def build(config: ScoreConfig) -> tuple[Consumer, ScoreStore]:
    """Composition root of the consumer process."""
    store = ScoreStore(redis.Redis.from_url(config.score_redis_url), config.score_key_prefix)
    applier = Applier(store)
    topology = config.topology(SERVICE)
    healing = Healing(store, config.amqp_url, config.events_exchange, topology.queue)
    consumer = Consumer(
        ConsumerSettings(config.amqp_url, topology),
        applier,
        batch_handler=applier.batch,
        probe=store.consumer_probe,
        healing=healing,
        handles=frozenset(HANDLERS),
    )
    return consumer, store


def beat(consumer: Consumer, store: ScoreStore, replica: str) -> None:
    """The beacon's beat: heal a lost store, then report this replica's health and statistics
    for the API."""
    state = consumer.healing.check() if consumer.healing is not None else READY
    health = consumer.health() or ("ok" if state == READY else state)
    store.beat(replica, {"health": health, "stats": consumer.stats.snapshot()}, BEAT_TTL_SECONDS)


def main() -> int:
    config = ScoreConfig()
    configure_logging(config.log_level)
    tracing.configure("score-consumer")
    consumer, store = build(config)
    replica = replica_id()
    heartbeat = AttachedBeacon(
        consumer, lambda: beat(consumer, store, replica), every=HEARTBEAT_SECONDS
    )
    heartbeat.start()
    try:
        return run_until_signalled(consumer)
    finally:
        heartbeat.stop()


if __name__ == "__main__":
    raise SystemExit(main())
