"""The score consumer: translate person-service events into version-gated read-model changes.

python -m score.consumer runs it as a process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import redis
from messaging import (
    Consumer,
    ConsumerSettings,
    Envelope,
    PermanentError,
    RetryableError,
    Topology,
)
from messaging.runner import AttachedBeacon, configure_logging, run_until_signalled

from .config import ScoreConfig
from .store import Change, ItemChange, PersonChange, ScoreStore

SERVICE = "score"
ITEM_KINDS = ("income", "asset", "debt")
HEARTBEAT_KEY = "consumer-attached"
STATS_KEY = "consumer-stats"  # the consumer's ConsumerStats snapshot, for the API's /metrics
HEARTBEAT_SECONDS = 2.0


def to_change(envelope: Envelope) -> Change | None:
    """The read-model change an event asks for; None for events this model ignores."""
    deleted = envelope.data is None
    if envelope.entity == "person":
        return PersonChange(envelope.entity_id, envelope.entity_version, deleted)
    if envelope.entity not in ITEM_KINDS:
        return None  # another producer's entity: not part of this read model
    if deleted:
        return ItemChange(envelope.entity_id, envelope.entity_version, True)
    data = envelope.data
    try:
        value = Decimal(str(data["value"]))
        cpf = str(data["cpf"])
    except (KeyError, TypeError, InvalidOperation) as exc:
        raise PermanentError(
            f"{envelope.event_type} data lacks a cpf or a decimal value: {exc!r}"
        ) from None
    if not value.is_finite() or value < 0 or not cpf:
        raise PermanentError(f"{envelope.event_type} has an invalid value or cpf")
    return ItemChange(
        envelope.entity_id, envelope.entity_version, False, cpf, envelope.entity, value
    )


class Applier:
    """Handler for the consumer runtime: one event, or a batch in one Redis round trip."""

    def __init__(self, store: ScoreStore) -> None:
        self.store = store

    def __call__(self, envelope: Envelope) -> None:
        self.batch([envelope])

    def batch(self, envelopes: Sequence[Envelope]) -> None:
        changes = [c for c in map(to_change, envelopes) if c is not None]
        if not changes:
            return
        try:
            self.store.apply(changes)
        except redis.RedisError as exc:
            raise RetryableError(f"redis: {exc}") from exc


def build(config: ScoreConfig) -> tuple[Consumer, ScoreStore]:
    """Composition root of the consumer process."""
    store = ScoreStore(redis.Redis.from_url(config.score_redis_url), config.score_key_prefix)
    applier = Applier(store)
    topology = Topology(SERVICE, config.events_exchange, config.retry_delays)
    consumer = Consumer(
        ConsumerSettings(config.amqp_url, topology), applier, batch_handler=applier.batch
    )
    return consumer, store


def main() -> int:
    config = ScoreConfig()
    configure_logging(config.log_level)
    consumer, store = build(config)
    key = f"{store.prefix}{HEARTBEAT_KEY}"

    def beat() -> None:
        pipe = store.client.pipeline(transaction=False)
        pipe.set(key, "1", ex=int(HEARTBEAT_SECONDS * 5))
        pipe.set(f"{store.prefix}{STATS_KEY}", json.dumps(consumer.stats.snapshot()))
        pipe.execute()

    heartbeat = AttachedBeacon(consumer, beat, every=HEARTBEAT_SECONDS)
    heartbeat.start()
    try:
        return run_until_signalled(consumer)
    finally:
        heartbeat.stop()


if __name__ == "__main__":
    raise SystemExit(main())
