"""The person service's configuration, read once into a frozen object."""

from __future__ import annotations

from messaging.settings import DEVELOPMENT_SECRET, ServiceSettings, check_activation_secret
from pydantic import model_validator


class PersonConfig(ServiceSettings):
    person_database_url: str = "postgresql://postgres@127.0.0.1:5432/person"
    activation_secret: str = DEVELOPMENT_SECRET
    activation_ttl_seconds: int = 172_800
    max_body_bytes: int = 64 * 1024
    bulk_max_bytes: int = 32 * 1024 * 1024  # POST /person/bulk only
    bulk_max_items: int = 100_000
    import_batch_size: int = 500
    import_poll_seconds: float = 1.0
    db_pool_size: int = 10
    activation_resend_seconds: float = 60.0
    imports_queued_per_key: int = 3

    @model_validator(mode="after")
    def _production_needs_a_secret(self) -> PersonConfig:
        check_activation_secret(self, self.activation_secret)
        return self
