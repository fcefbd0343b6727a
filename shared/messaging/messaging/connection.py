"""Broker connections and the backoff every reconnect loop shares.

`AMQP_URL` may name several nodes of one cluster, comma-separated. A connection tries the nodes
one at a time, starting from a position that moves on with every attempt in the process, and
any failure of one node (refused, a name that does not resolve, TLS, a timeout) moves on to the
next; only when every node failed does it raise. A client whose node went away connects again
the same way, so it lands on another node. (pika's own workflow over a list of parameters gives
up on the whole list when one name does not resolve, hence one node per attempt here.)
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator

import pika
from pika.adapters.blocking_connection import BlockingConnection

HEARTBEAT_SECONDS = 15
BLOCKED_TIMEOUT_SECONDS = 60


def node_urls(url: str) -> list[str]:
    """The node URLs of an AMQP_URL ("amqp://a/%2F,amqp://b/%2F" names two nodes)."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ValueError("AMQP_URL names no broker")
    for n, node in enumerate(urls, 1):
        scheme, found, _ = node.partition("://")
        if not found or scheme.lower() not in ("amqp", "amqps"):
            # The URL itself is not repeated: it may hold a password.
            what = f"{scheme}://" if found else "no scheme"
            raise ValueError(
                f"AMQP_URL: node {n} is not an amqp:// or amqps:// URL ({what}); "
                "several nodes are separated by commas"
            )
    return urls


def amqp_parameters(url: str, client_name: str) -> list[pika.URLParameters]:
    """Parameters for each node: a dead broker is detected within a few heartbeats."""
    every = []
    for node in node_urls(url):
        params = pika.URLParameters(node)
        params.heartbeat = HEARTBEAT_SECONDS
        params.blocked_connection_timeout = BLOCKED_TIMEOUT_SECONDS
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.client_properties = {"connection_name": client_name}
        every.append(params)
    return every


_ROTATION = itertools.count()


def rotated(nodes: list[pika.URLParameters]) -> Iterator[pika.URLParameters]:
    """Every node once, starting from the next position of this process's rotation."""
    start = next(_ROTATION) % len(nodes)
    for offset in range(len(nodes)):
        yield nodes[(start + offset) % len(nodes)]


def where(params: pika.URLParameters) -> str:
    """A node as logs may show it: host and port, never the credentials."""
    return f"{params.host}:{params.port}"


def connect(
    url: str, client_name: str, timeout: float | None = None, heartbeat: int | None = None
) -> BlockingConnection:
    """A blocking connection to a node of `url` that answers (see the module docstring)."""
    every = amqp_parameters(url, client_name)
    failures = []
    for params in rotated(every):
        if timeout is not None:
            params.socket_timeout = params.blocked_connection_timeout = timeout
        if heartbeat is not None:
            params.heartbeat = heartbeat
        try:
            return BlockingConnection(params)
        except Exception as exc:  # any failure of one node: the next one
            failures.append(f"{where(params)}: {type(exc).__name__}: {exc or '-'}"[:300])
    raise pika.exceptions.AMQPConnectionError(f"no broker node answered ({'; '.join(failures)})")


class Backoff:
    """Exponential backoff with full jitter, capped; reset after a success."""

    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self.first, self.cap = first, cap
        self._attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.first * (2**self._attempt))
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


class StopFlag:
    """A settable flag with an interruptible wait, shared by a process's loops."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Wait up to `seconds`; return True if the flag was set meanwhile."""
        return self._event.wait(seconds)


class BrokerProbe:
    """Raises unless the broker accepted a connection within the last `ttl` seconds (/ready)."""

    def __init__(self, url: str, ttl: float = 5.0) -> None:
        self.url, self.ttl = url, ttl
        self._ok_at = float("-inf")
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            if time.monotonic() - self._ok_at < self.ttl:
                return
            connect(self.url, "readiness-probe", timeout=2).close()
            self._ok_at = time.monotonic()
