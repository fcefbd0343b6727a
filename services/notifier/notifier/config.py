"""The notifier's configuration, read once into a frozen object."""

from __future__ import annotations

from messaging.settings import BrokerSettings
from pydantic import Field, field_validator, model_validator
from servicekit.database import check_url

# The development value of ACTIVATION_SECRET, which the person and notifier services share (the
# notifier signs activation links, the person service checks them); refused in production.
DEVELOPMENT_ACTIVATION_SECRET = "development-activation-secret"


class NotifierConfig(BrokerSettings):
    events_exchange: str = "entity-changes"  # EVENTS_EXCHANGE
    notifier_database_url: str = "postgresql://postgres@127.0.0.1:5432/notifier"
    sendgrid_api_key: str | None = None
    sendgrid_host: str = "https://api.sendgrid.com"
    sendgrid_timeout_seconds: float = 10.0
    sendgrid_ca_file: str | None = None  # PEM CAs trusted for SendGrid instead of the system's
    email_from: str = "no-reply@example.com"
    public_person_url: str | None = None
    activation_secret: str = DEVELOPMENT_ACTIVATION_SECRET
    gateway_port: int = 8000  # the development links: http://<service>.localhost:<port>
    activation_ttl_seconds: int = 172_800
    public_notifier_url: str | None = None
    emails_per_address_per_day: int = 10
    sender_poll_seconds: float = 1.0
    # How long an idle sender, woken by a recorded delivery, waits for more before it looks: the
    # mailbox takes the e-mails recorded meanwhile in one statement, SendGrid's workers share
    # them (0: at once).
    sender_linger_seconds: float = Field(0.05, ge=0, le=1, allow_inf_nan=False)
    sender_max_attempts: int = 8
    sender_lease_seconds: float = 300.0
    sender_concurrency: int = 8
    sender_backoff_cap_seconds: float = 300.0
    db_pool_size: int = 5
    # Retention (notifier/retention.py), pruned by the sender every RETENTION_INTERVAL_SECONDS.
    delivery_text_retention_days: float = Field(7.0, gt=0)
    mailbox_retention_days: float = Field(7.0, gt=0)
    tombstone_retention_days: float = Field(30.0, gt=0)
    retention_interval_seconds: float = Field(3600.0, gt=0)
    retention_batch: int = Field(500, ge=1)

    @field_validator("notifier_database_url")
    @classmethod
    def _database(cls, value: str) -> str:
        return check_url("NOTIFIER_DATABASE_URL", value)  # several servers: the writable one

    @model_validator(mode="after")
    def _lease_outlasts_a_call(self) -> NotifierConfig:
        # A claim older than the lease is taken again: it must outlast one call to SendGrid.
        if self.sender_lease_seconds <= 2 * self.sendgrid_timeout_seconds:
            raise ValueError("SENDER_LEASE_SECONDS must be over twice SENDGRID_TIMEOUT_SECONDS")
        if self.sender_concurrency < 1:
            raise ValueError("SENDER_CONCURRENCY must be at least 1")
        return self

    @model_validator(mode="after")
    def _production_is_closed(self) -> NotifierConfig:
        self.check_secret(
            "ACTIVATION_SECRET", self.activation_secret, DEVELOPMENT_ACTIVATION_SECRET
        )
        if self.production and not self.sendgrid_api_key:
            raise ValueError("SENDGRID_API_KEY must be set when APP_ENV=production")
        if self.production and not self.public_person_url:
            raise ValueError("PUBLIC_PERSON_URL must be set when APP_ENV=production")
        return self

    @property
    def mailbox_open(self) -> bool:
        """The development mailbox: development only, and only without SendGrid."""
        return not self.production and not self.sendgrid_api_key

    @property
    def notifier_url(self) -> str:
        """Base of the mailbox's own links (PUBLIC_NOTIFIER_URL, else through the gateway)."""
        return (
            self.public_notifier_url or f"http://notifier.localhost:{self.gateway_port}"
        ).rstrip("/")

    @property
    def person_url(self) -> str:
        """Base of activation links (PUBLIC_PERSON_URL, by default through the gateway)."""
        return (self.public_person_url or f"http://person.localhost:{self.gateway_port}").rstrip(
            "/"
        )
