"""The console's configuration, read once into a frozen object."""

from __future__ import annotations

from messaging.settings import BrokerSettings
from pydantic import Field, field_validator, model_validator
from servicekit.database import check_url
from servicekit.settings import MIN_SECRET_LENGTH

DEVELOPMENT_SECRET = "development-console-secret"


class ConsoleConfig(BrokerSettings):
    events_exchange: str = "entity-changes"  # EVENTS_EXCHANGE
    console_database_url: str = "postgresql://postgres@127.0.0.1:5432/console"  # the audit log
    # Each service's own API, called as any client does, with the console's key (the producer's
    # outbox too: the person API's admin routes GET /outbox and /outbox/history).
    person_api_url: str = "http://127.0.0.1:8101"
    score_api_url: str = "http://127.0.0.1:8102"
    notifier_api_url: str = "http://127.0.0.1:8103"
    console_api_key: str | None = None  # person:read, score:read, notifier:read, metrics, admin
    # Keys the session ids the console stores (the HMAC of each cookie's random token).
    console_secret: str = DEVELOPMENT_SECRET
    # A session (kept in the console's database) ends at sign-out, this long after it began, or
    # this long after its last request, whichever comes first.
    console_session_seconds: int = Field(8 * 3600, ge=60)
    console_session_idle_seconds: int = Field(30 * 60, ge=60)
    # Failed sign-ins (the form, or a bearer key on a page) from one client address: past this
    # many within the window, 429 with Retry-After until the oldest of them leaves it.
    console_signin_failures: int = Field(5, ge=1)
    console_signin_window_seconds: int = Field(15 * 60, ge=1)
    # Proxies in front that add the client's address to X-Forwarded-For (Traefik: 1).
    console_proxies: int = Field(1, ge=0)
    console_consumers: tuple[str, ...] = ("score", "notifier")  # whose queues it shows
    # Dead letters a page reads (and holds unacknowledged, briefly) from each dead queue at most.
    console_dlq_window: int = Field(500, ge=1)

    @field_validator("console_database_url")
    @classmethod
    def _database(cls, value: str) -> str:
        return check_url("CONSOLE_DATABASE_URL", value)  # several servers: the writable one

    @model_validator(mode="after")
    def _production_is_closed(self) -> ConsoleConfig:
        if self.production and (
            self.console_secret == DEVELOPMENT_SECRET
            or len(self.console_secret) < MIN_SECRET_LENGTH
        ):
            raise ValueError(
                f"CONSOLE_SECRET must be set, {MIN_SECRET_LENGTH} characters or more, "
                "when APP_ENV=production"
            )
        return self
