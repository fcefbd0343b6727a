"""The person service's outbox relay process: python -m person.relay."""

from __future__ import annotations

from messaging import Relay, RelaySettings
from messaging.runner import configure_logging, run_until_signalled

from .config import PersonConfig


def main() -> int:
    config = PersonConfig()
    configure_logging(config.log_level)
    settings = RelaySettings(
        database_url=config.person_database_url,
        amqp_url=config.amqp_url,
        exchange=config.events_exchange,
        producer="person",
    )
    return run_until_signalled(Relay(settings))


if __name__ == "__main__":
    raise SystemExit(main())
