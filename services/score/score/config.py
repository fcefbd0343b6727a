"""The score service's configuration, read once into a frozen object."""

from __future__ import annotations

from messaging.settings import BrokerSettings
from pydantic import Field


class ScoreConfig(BrokerSettings):
    events_exchange: str = "entity-changes"  # EVENTS_EXCHANGE
    score_redis_url: str = "redis://127.0.0.1:6379/0"
    score_key_prefix: str = "score:"
    # Retention (score/retention.py), pruned by the consumer every RETENTION_INTERVAL_SECONDS.
    tombstone_retention_days: float = Field(30.0, gt=0)
    retention_interval_seconds: float = Field(3600.0, gt=0)
    retention_batch: int = Field(500, ge=1)
