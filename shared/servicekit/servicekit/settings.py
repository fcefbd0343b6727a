"""Settings every process shares: read once from the environment, then `.env`, then defaults."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .auth import ApiKeys

MIN_SECRET_LENGTH = 32
# What a deployment's files hold where the operator's own secret goes (the Kubernetes manifests'
# Secret): never a value, in any mode.
PLACEHOLDER = "REPLACE-ME"


def refuse_placeholder(name: str, value: str) -> None:
    """ValueError naming the variable (never its value) when it still holds the placeholder."""
    if PLACEHOLDER in value.upper():
        raise ValueError(
            f"{name} holds the placeholder {PLACEHOLDER}: replace it with a value of your own "
            "before starting"
        )


class ServiceSettings(BaseSettings):
    """Base of each process's frozen configuration object: the one parser of these variables."""

    # Settings hold secrets: a refusal names the variable, never echoes its value.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    app_env: Literal["development", "production"] = "development"
    log_level: str = "INFO"
    api_keys: str | None = None  # JSON: {"<sha256 hex of a key>": ["scope", ...]}

    @model_validator(mode="before")
    @classmethod
    def _no_placeholder(cls, data: Any) -> Any:
        # Before the fields' own checks, so API_KEYS=REPLACE-ME is named as a placeholder rather
        # than as JSON that does not parse; URLs too (a password inside AMQP_URL).
        if isinstance(data, dict):
            for name, value in data.items():
                if isinstance(value, str):
                    refuse_placeholder(name.upper(), value)
        return data

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
