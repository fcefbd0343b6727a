"""Declare consumers' queues before start-up: python -m messaging.declare SERVICE..."""

from __future__ import annotations

import sys

from .connection import connect
from .settings import ServiceSettings


def main(argv: list[str] | None = None) -> int:
    """python -m messaging.declare SERVICE...: declare each service's queues before start-up.

    Declaring every subscriber's queue before the relay runs means no event is routed while a
    consumer's queue does not exist yet (the relay would hold it, returned, until one did).
    The caller names the services (the stack script and compose do).
    """
    services = argv if argv is not None else sys.argv[1:]
    if not services:
        print("usage: python -m messaging.declare SERVICE...", file=sys.stderr)
        return 2
    settings = ServiceSettings()
    conn = connect(settings.amqp_url, "topology")
    try:
        for service in services:
            topology = settings.topology(service)
            topology.declare(conn)
            print(f"declared {topology.queue} (+ retry and dead queues) on {topology.exchange}")
    finally:
        if conn.is_open:
            conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
