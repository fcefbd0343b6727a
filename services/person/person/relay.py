"""The person service's outbox relay process: python -m person.relay.

Besides publishing the outbox, it serves read models' replay requests (messaging.replay).
"""

from __future__ import annotations

from messaging import Relay, RelaySettings
from messaging.replay_server import ReplayServer
from servicekit import tracing
from servicekit.runner import configure_logging, run_until_signalled

from .config import PersonConfig


def main() -> int:
    config = PersonConfig()
    configure_logging(config.log_level)
    tracing.configure("person-relay")
    settings = RelaySettings(
        database_url=config.person_database_url,
        amqp_url=config.amqp_url,
        exchange=config.events_exchange,
        producer="person",
    )
    server = ReplayServer(
        config.person_database_url,
        config.amqp_url,
        config.events_exchange,
        targets=config.replay_queues,
        min_interval=config.replay_min_interval_seconds,
    )
    server.start()
    try:
        return run_until_signalled(Relay(settings))
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
