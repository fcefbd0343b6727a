"""The person service's configuration, read once into a frozen object."""

from __future__ import annotations

from typing import Annotated

from messaging.settings import BrokerSettings
from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode
from servicekit.database import check_url

# The development value of ACTIVATION_SECRET, which the person and notifier services share (the
# notifier signs activation links, the person service checks them); refused in production.
DEVELOPMENT_ACTIVATION_SECRET = "development-activation-secret"


class PersonConfig(BrokerSettings):
    events_exchange: str = "entity-changes"  # EVENTS_EXCHANGE
    person_database_url: str = "postgresql://postgres@127.0.0.1:5432/person"
    activation_secret: str = DEVELOPMENT_ACTIVATION_SECRET
    activation_ttl_seconds: int = 172_800
    max_body_bytes: int = 64 * 1024
    bulk_max_bytes: int = 32 * 1024 * 1024  # POST /person/bulk only
    bulk_max_items: int = 100_000
    import_batch_size: int = 500
    import_poll_seconds: float = 1.0
    db_pool_size: int = 10
    activation_resend_seconds: float = 60.0
    # Activation e-mails one API key may ask for per UTC day (429 past it).
    activation_requests_per_key_per_day: int = Field(200, ge=1)
    imports_queued_per_key: int = 3
    # Retention (person/retention.py), pruned by the importer every RETENTION_INTERVAL_SECONDS.
    import_retention_days: float = Field(7.0, gt=0)
    retention_interval_seconds: float = Field(3600.0, gt=0)
    retention_batch: int = Field(500, ge=1)
    # Incomes, assets and debts per person (422 past it): each score read walks them all.
    items_per_person_max: int = Field(1_000, ge=1)
    # The consuming services whose work queues the relay replays to on request (no other).
    replay_targets: Annotated[tuple[str, ...], NoDecode] = ("score", "notifier")
    replay_min_interval_seconds: float = Field(30.0, ge=0)  # between two replays to one

    @field_validator("person_database_url")
    @classmethod
    def _database(cls, value: str) -> str:
        return check_url("PERSON_DATABASE_URL", value)  # several servers: the writable one

    @field_validator("replay_targets", mode="before")
    @classmethod
    def _services(cls, value: object) -> object:
        """REPLAY_TARGETS is comma-separated: score,notifier."""
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @property
    def replay_queues(self) -> list[str]:
        """The work queues replay requests may name."""
        return [self.topology(service).queue for service in self.replay_targets]

    @model_validator(mode="after")
    def _production_needs_a_secret(self) -> PersonConfig:
        self.check_secret(
            "ACTIVATION_SECRET", self.activation_secret, DEVELOPMENT_ACTIVATION_SECRET
        )
        return self
