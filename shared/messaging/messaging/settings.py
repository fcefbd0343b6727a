"""Settings every service shares: read once from the environment, then `.env`, then defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .auth import ApiKeys
from .connection import node_urls
from .topology import DEFAULT_RETRY_DELAYS, Topology

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


class ServiceSettings(BaseSettings):
    """Base of each process's frozen configuration object: the one parser of these variables."""

    # Settings hold secrets: a refusal names the variable, never echoes its value.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    app_env: Literal["development", "production"] = "development"
    amqp_url: str = DEFAULT_AMQP_URL
    events_exchange: str = "entity-changes"
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    queue_group_size: int | None = None
    gateway_port: int = 8000
    log_level: str = "INFO"
    api_keys: str | None = None  # JSON: {"<sha256 hex of a key>": ["scope", ...]}

    @property
    def production(self) -> bool:
        return self.app_env == "production"

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            ApiKeys.parse(value)  # ValueError naming API_KEYS and the entry
            return value
        return None

    def api_key_store(self) -> ApiKeys | None:
        """The keys an API accepts; None (every route open) only in development."""
        if self.api_keys is None:
            if self.production:
                raise ValueError("API_KEYS must be set when APP_ENV=production")
            return None
        return ApiKeys.parse(self.api_keys)

    @field_validator("amqp_url")
    @classmethod
    def _nodes(cls, value: str) -> str:
        node_urls(value)  # at least one URL
        return value

    @field_validator("retry_delays")
    @classmethod
    def _positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(delay <= 0 for delay in value):
            raise ValueError("RETRY_DELAYS must be a JSON list of positive seconds")
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


DEVELOPMENT_SECRET = "development-activation-secret"
MIN_SECRET_LENGTH = 32


def check_activation_secret(settings: ServiceSettings, secret: str) -> None:
    """In production the activation secret is the operator's own and long enough."""
    if not settings.production:
        return
    if secret == DEVELOPMENT_SECRET:
        raise ValueError("ACTIVATION_SECRET must be set when APP_ENV=production")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"ACTIVATION_SECRET must have at least {MIN_SECRET_LENGTH} characters in production"
        )
