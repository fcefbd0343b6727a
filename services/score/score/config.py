"""The score service's configuration, read once into a frozen object."""

from __future__ import annotations

from messaging.settings import BrokerSettings
from messaging.stores import cluster_nodes
from pydantic import field_validator


class ScoreConfig(BrokerSettings):
    events_exchange: str = "entity-changes"  # EVENTS_EXCHANGE
    # One Redis (redis://host:port/db), or a Redis Cluster: redis+cluster://host:port,host:port
    # or several redis:// URLs separated by commas (messaging.redis_client).
    score_redis_url: str = "redis://127.0.0.1:6379/0"
    score_key_prefix: str = "score:"

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
