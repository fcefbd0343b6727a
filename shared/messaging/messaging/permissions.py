"""What each role may do on the broker: RabbitMQ's configure, write and read regexes per virtual
host, computed from the topology's names (topology.py, replay.py).

RabbitMQ checks a resource's name against one regex per kind of access:

- configure: declare (not passively) or delete a queue or exchange;
- write: publish to an exchange, bind a queue (write on the queue, read on the exchange);
- read: consume or get from a queue, purge it, bind from an exchange.

A passive declaration needs no permission, so a role that only uses what the migrate step
declared (`messaging declare`) needs no configure on it. Publishing to a queue by name goes
through the default exchange, `amq.default`: write there lets a role publish to any queue by
name (RabbitMQ has no per-queue write check on it). The consumers need it for their retries, the
relay for replays, the operator to give dead letters back; none of them gets write on the events
exchange but the relay, so no credential but the relay's can publish an event every subscriber
receives (docs/security.md).

Roles:

- `relay`: the producer's relay: declares and publishes to the events exchange, serves replay
  requests (declares and reads `<exchange>.replay-requests`, publishes replays to the queues).
- each consuming service (the `consumers` the caller names): declares its own work, retry
  and dead queues and binds its work queue to the exchange; reads its own queues; publishes its
  retries, and its replay requests and verification reports (default exchange).
- `operator` (the console and the `messaging` command): reads and purges the dead queues and
  gives their letters back (default exchange); `messaging verify` declares and reads a queue the
  broker names for it (`amq.gen-...`).
- `probe`: an API's readiness check: connects, nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .replay import requests_queue
from .topology import Topology

NOTHING = "^$"  # matches no name RabbitMQ checks
DEFAULT_EXCHANGE = "amq.default"
RELAY, OPERATOR, PROBE = "relay", "operator", "probe"


def _any_of(names: Iterable[str], patterns: Iterable[str] = ()) -> str:
    """A regex matching exactly these names (escaped) and these patterns."""
    alternatives = sorted({re.escape(name) for name in names} | set(patterns))
    return f"^({'|'.join(alternatives)})$" if alternatives else NOTHING


def _own_queues(topology: Topology) -> str:
    """The work, retry and dead queues of one consumer, and the queues a migration of them uses
    (`<queue>.migrating`, `<queue>.migration-lock`): the work queue's name and what follows a
    dot after it."""
    return f"{re.escape(topology.queue)}(\\..+)?"


def roles(consumers: Iterable[str]) -> tuple[str, ...]:
    return (RELAY, *consumers, OPERATOR, PROBE)


def permissions(role: str, exchange: str, consumers: Iterable[str]) -> dict[str, str]:
    """The configure, write and read regexes of `role` on the vhost of `exchange`, where
    `consumers` are the consuming services (the operator reads their dead queues)."""
    consumers = tuple(consumers)
    requests = requests_queue(exchange)
    if role == RELAY:
        return {
            "configure": _any_of([exchange, requests]),
            "write": _any_of([exchange, DEFAULT_EXCHANGE]),
            "read": _any_of([requests]),
        }
    if role in consumers:
        own = _own_queues(Topology(role, exchange))
        return {
            "configure": _any_of([], [own]),
            "write": _any_of([DEFAULT_EXCHANGE], [own]),
            # read on the exchange: binding its work queue to it
            "read": _any_of([exchange], [own]),
        }
    if role == OPERATOR:
        dead = [Topology(consumer, exchange).dead_queue for consumer in consumers]
        return {
            "configure": _any_of([], ["amq\\.gen-.+"]),
            "write": _any_of([DEFAULT_EXCHANGE]),
            "read": _any_of(dead, ["amq\\.gen-.+"]),
        }
    if role == PROBE:
        return {"configure": NOTHING, "write": NOTHING, "read": NOTHING}
    raise ValueError(f"no such broker role: {role!r} (one of {', '.join(roles(consumers))})")
