"""The score service's configuration, read once into a frozen object."""

from __future__ import annotations

from messaging.settings import BrokerSettings
from messaging.stores import cluster_nodes
from pydantic import Field, field_validator


class ScoreConfig(BrokerSettings):
    events_exchange: str = "entity-changes"  # EVENTS_EXCHANGE
    # One Redis (redis://host:port/db), or a Redis Cluster: redis+cluster://host:port,host:port
    # or several redis:// URLs separated by commas (messaging.redis_client).
    score_redis_url: str = "redis://127.0.0.1:6379/0"
    score_key_prefix: str = "score:"
    # Retention (score/retention.py), pruned by the consumer every RETENTION_INTERVAL_SECONDS.
    tombstone_retention_days: float = Field(30.0, gt=0)
    retention_interval_seconds: float = Field(3600.0, gt=0)
    retention_batch: int = Field(500, ge=1)

    @field_validator("score_redis_url")
    @classmethod
    def _nodes(cls, value: str) -> str:
        cluster_nodes(value)  # a cluster's nodes are host:port, database 0
        return value

    @field_validator("score_key_prefix")
    @classmethod
    def _untagged(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError(
                "SCORE_KEY_PREFIX must hold no { or }: the keys' hash tags (Redis Cluster) use them"
            )
        return value
