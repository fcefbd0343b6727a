"""The score consumer: translate person-service events into version-gated read-model changes.

python -m score.consumer runs it as a process.
"""

from __future__ import annotations

from decimal import Decimal

from messaging import Consumer, ConsumerSettings, Envelope, Handlers
from messaging.healing import Healing
from messaging.replicas import AttachedBeacon
from messaging.verification import Verification
from pydantic import BaseModel, ConfigDict, Field
from servicekit import tracing
from servicekit.runner import configure_logging, replica_id, run_until_signalled

from . import retention
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


# The person service's event types this model reads, each with the model of its data and what
# it becomes (the person service's catalogue is published at person.localhost/asyncapi.json;
# tests/test_catalogue.py checks these against it). The runtime lets only these through.
HANDLERS = Handlers()
ENTITIES = ("person", *KINDS)  # the entity types the model holds, verified against the producer


@HANDLERS.on("person.created", "person.updated", "person.activation_requested", "person.deleted")
def person_change(event: Envelope, _data: object) -> Change:
    return PersonChange(event.entity_id, event.entity_version, event.data is None)


@HANDLERS.on(*(f"{kind}.created" for kind in KINDS), data=ItemFields)
def item_created(event: Envelope, item: ItemFields) -> Change:
    return ItemChange(
        event.entity_id, event.entity_version, False, item.cpf, event.entity, Decimal(item.value)
    )


@HANDLERS.on(*(f"{kind}.deleted" for kind in KINDS))
def item_deleted(event: Envelope, _data: None) -> Change:
    return ItemChange(event.entity_id, event.entity_version, True, kind=event.entity)


def build(config: ScoreConfig, store: ScoreStore | None = None) -> tuple[Consumer, ScoreStore]:
    """Composition root of the consumer process (tests pass their own store)."""
    if store is None:
        store = ScoreStore.from_url(config.score_redis_url, config.score_key_prefix)
    topology = config.topology(SERVICE)
    healing = Healing(store.marker, config.amqp_url, config.events_exchange, topology.queue)
    # the entity types the model holds, verified against the producer's digests
    verification = Verification.scheduled(config, store, topology.queue, ENTITIES)
    consumer = Consumer(
        ConsumerSettings(config.amqp_url, topology, linger=config.consumer_linger_seconds),
        HANDLERS,
        store.apply,  # a batch of changes in one Redis round trip
        probe=store.consumer_probe,
        healing=healing,
        verification=verification,
    )
    return consumer, store


def beat(consumer: Consumer, store: ScoreStore, replica: str) -> None:
    """The beacon's beat: this replica's health (or the model's rebuild state) and statistics,
    for the API."""
    report = {"health": consumer.report(), "stats": consumer.stats.snapshot()}
    store.beat(replica, report, BEAT_TTL_SECONDS)


def main() -> int:
    config = ScoreConfig()
    configure_logging(config.log_level)
    tracing.configure("score-consumer")
    consumer, store = build(config)
    retention.pruner(config, store).start()  # beside the consuming, in this long-running process
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
