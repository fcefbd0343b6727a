"""Settings every process shares: read once from the environment, then `.env`, then defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .auth import ApiKeys

MIN_SECRET_LENGTH = 32


class ServiceSettings(BaseSettings):
    """Base of each process's frozen configuration object: the one parser of these variables."""

    # Settings hold secrets: a refusal names the variable, never echoes its value.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    app_env: Literal["development", "production"] = "development"
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

    def check_secret(self, name: str, value: str, development_value: str) -> None:
        """In production a secret is the operator's own (not the development value) and long
        enough; the refusal names the variable, never the value."""
        if not self.production:
            return
        if value == development_value:
            raise ValueError(f"{name} must be set when APP_ENV=production")
        if len(value) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"{name} must have at least {MIN_SECRET_LENGTH} characters in production"
            )
