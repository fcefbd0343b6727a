"""Settings every service shares: read once from the environment, then `.env`, then defaults."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Base of each service's frozen configuration object."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    app_env: str = "development"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    events_exchange: str = "entity-changes"
    gateway_port: int = 8000
    log_level: str = "INFO"

    @property
    def production(self) -> bool:
        return self.app_env == "production"
