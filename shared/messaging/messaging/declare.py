"""Declare consumers' queues before start-up: python -m messaging.declare SERVICE..."""

from __future__ import annotations

import json
import os
import sys

import pika

from .connection import amqp_parameters
from .topology import DEFAULT_RETRY_DELAYS, Topology


def retry_delays() -> tuple[float, ...]:
    """RETRY_DELAYS as the consumers read it (a JSON list of seconds), else the default steps."""
    raw = os.environ.get("RETRY_DELAYS")
    if not raw:
        return DEFAULT_RETRY_DELAYS
    delays = json.loads(raw)
    if (
        not isinstance(delays, list)
        or not delays
        or not all(isinstance(d, int | float) and d > 0 for d in delays)
    ):
        raise SystemExit(f"RETRY_DELAYS must be a JSON list of positive seconds, not {raw!r}")
    return tuple(float(d) for d in delays)


def main(argv: list[str] | None = None) -> int:
    """python -m messaging.declare SERVICE...: declare each service's queues before start-up.

    Declaring every subscriber's queue before the relay runs means no event is routed while a
    consumer's queue does not exist yet (the relay would hold it, returned, until one did).
    """

    services = (argv if argv is not None else sys.argv[1:]) or ["score", "notifier"]
    exchange = os.environ.get("EVENTS_EXCHANGE", "entity-changes")
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    conn = pika.BlockingConnection(amqp_parameters(url, "topology"))
    try:
        channel = conn.channel()
        for service in services:
            topology = Topology(service, exchange, retry_delays())
            topology.declare(channel)
            print(f"declared {topology.queue} (+ retry and dead queues) on {exchange}")
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
