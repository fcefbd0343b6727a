"""The score consumer: translate person-service events into version-gated read-model changes.

python -m score.consumer runs it as a process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from decimal import Decimal

import redis
from messaging import Consumer, ConsumerSettings, Envelope, PermanentError
from messaging.healing import READY, Healing
from messaging.runner import AttachedBeacon, configure_logging, run_until_signalled

from .config import ScoreConfig
from .scoring import KINDS
from .store import Change, ItemChange, PersonChange, ScoreStore

SERVICE = "score"
HEARTBEAT_KEY = "consumer-attached"
STATS_KEY = "consumer-stats"  # the consumer's ConsumerStats snapshot, for the API's /metrics
HEARTBEAT_SECONDS = 2.0
# What the producer's numeric(17, 2) column prints: at most 15 digits, then up to 2 decimals.
_VALUE = re.compile(r"[0-9]{1,15}(\.[0-9]{1,2})?")
_CPF = re.compile(r"[0-9]{1,14}")


def to_change(envelope: Envelope) -> Change | None:
    """The read-model change an event asks for; None for events this model ignores."""
    deleted = envelope.data is None
    if envelope.entity == "person":
        return PersonChange(envelope.entity_id, envelope.entity_version, deleted)
    if envelope.entity not in KINDS:
        return None  # another producer's entity: not part of this read model
    if deleted:
        return ItemChange(envelope.entity_id, envelope.entity_version, True)
    data = envelope.data
    value, cpf = data.get("value"), data.get("cpf")
    if not isinstance(value, str) or not _VALUE.fullmatch(value):
        raise PermanentError(
            f"{envelope.event_type} value must be a decimal string with at most 15 digits and "
            f"2 decimals, not {str(value)[:40]!r}"
        )
    if not isinstance(cpf, str) or not _CPF.fullmatch(cpf):
        raise PermanentError(f"{envelope.event_type} cpf must be 1 to 14 digits")
    return ItemChange(
        envelope.entity_id, envelope.entity_version, False, cpf, envelope.entity, Decimal(value)
    )


class Applier:
    """Handler for the consumer runtime: one event, or a batch in one Redis round trip."""

    def __init__(self, store: ScoreStore) -> None:
        self.store = store

    def __call__(self, envelope: Envelope) -> None:
        self.batch([envelope])

    def batch(self, envelopes: Sequence[Envelope]) -> None:
        changes = [c for c in map(to_change, envelopes) if c is not None]
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
        probe=store.ping,
        healing=healing,
    )
    return consumer, store


def beat(consumer: Consumer, store: ScoreStore) -> None:
    """The beacon's beat: heal a lost store, then report health and statistics for the API."""
    state = consumer.healing.check() if consumer.healing is not None else READY
    health = consumer.health() or ("ok" if state == READY else state)
    pipe = store.client.pipeline(transaction=False)
    pipe.set(f"{store.prefix}{HEARTBEAT_KEY}", health, ex=int(HEARTBEAT_SECONDS * 5))
    pipe.set(f"{store.prefix}{STATS_KEY}", json.dumps(consumer.stats.snapshot()))
    pipe.execute()


def main() -> int:
    config = ScoreConfig()
    configure_logging(config.log_level)
    consumer, store = build(config)
    heartbeat = AttachedBeacon(consumer, lambda: beat(consumer, store), every=HEARTBEAT_SECONDS)
    heartbeat.start()
    try:
        return run_until_signalled(consumer)
    finally:
        heartbeat.stop()


if __name__ == "__main__":
    raise SystemExit(main())
