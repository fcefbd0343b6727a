"""The score service's configuration, read once into a frozen object."""

from __future__ import annotations

from messaging.settings import BrokerSettings


class ScoreConfig(BrokerSettings):
    events_exchange: str = "entity-changes"  # EVENTS_EXCHANGE
    score_redis_url: str = "redis://127.0.0.1:6379/0"
    score_key_prefix: str = "score:"
