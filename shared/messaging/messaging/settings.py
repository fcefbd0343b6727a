"""The broker's settings every process of the pipeline shares (AMQP_URL, EVENTS_EXCHANGE,
RETRY_DELAYS, QUEUE_GROUP_SIZE), on top of the service kit's."""

from __future__ import annotations

from pydantic import field_validator
from servicekit.settings import ServiceSettings

from .connection import node_urls
from .topology import DEFAULT_RETRY_DELAYS, Topology

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


class BrokerSettings(ServiceSettings):
    """A process that talks to the broker: where it is, which exchange, the retry steps."""

    amqp_url: str = DEFAULT_AMQP_URL
    # No default: an experiment must never consume a live stream by accident. An application
    # names its exchange (its settings class gives the default it runs with).
    events_exchange: str
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    queue_group_size: int | None = None
    # How often a read model compares itself with the producer (verification.py); 0: never.
    verify_seconds: float = 60.0
    # How long a consumer's batch that is not full waits for more (ConsumerSettings.linger).
    consumer_linger_seconds: float = 0.01

    @field_validator("amqp_url")
    @classmethod
    def _nodes(cls, value: str) -> str:
        node_urls(value)  # at least one URL, each amqp:// or amqps://
        return value

    @field_validator("retry_delays")
    @classmethod
    def _positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(delay <= 0 for delay in value):
            raise ValueError("RETRY_DELAYS must be a JSON list of positive seconds")
        return value

    @field_validator("verify_seconds")
    @classmethod
    def _period(cls, value: float) -> float:
        if not value >= 0:  # NaN too
            raise ValueError("VERIFY_SECONDS must be 0 (never) or a positive number of seconds")
        return value

    @field_validator("consumer_linger_seconds")
    @classmethod
    def _linger(cls, value: float) -> float:
        if not 0 <= value <= 1:  # NaN too
            raise ValueError("CONSUMER_LINGER_SECONDS must be between 0 and 1 second")
        return value

    @field_validator("queue_group_size")
    @classmethod
    def _group(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("QUEUE_GROUP_SIZE must be at least 1")
        return value

    def topology(self, service: str) -> Topology:
        """The queues of a consuming service on this exchange, with these retry steps."""
        return Topology(service, self.events_exchange, self.retry_delays, self.queue_group_size)
