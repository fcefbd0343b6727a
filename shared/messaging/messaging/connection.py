"""Broker connection parameters and the backoff every reconnect loop shares."""

from __future__ import annotations

import random
import threading
import time

import pika

HEARTBEAT_SECONDS = 15
BLOCKED_TIMEOUT_SECONDS = 60


def amqp_parameters(url: str, client_name: str) -> pika.URLParameters:
    """Parameters for a connection that detects a dead broker within a few heartbeats."""
    params = pika.URLParameters(url)
    params.heartbeat = HEARTBEAT_SECONDS
    params.blocked_connection_timeout = BLOCKED_TIMEOUT_SECONDS
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.client_properties = {"connection_name": client_name}
    return params


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
            params = amqp_parameters(self.url, "readiness-probe")
            params.socket_timeout = params.blocked_connection_timeout = 2
            pika.BlockingConnection(params).close()
            self._ok_at = time.monotonic()
