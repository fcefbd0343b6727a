"""What the library's tests watch: the deliveries a handler saw, and the outbox rows not yet
published (through the library's own `outbox.backlog`)."""

from __future__ import annotations

import threading

import psycopg
from messaging import Envelope
from messaging.outbox import backlog


class Seen:
    """A handler recording delivered (entity_id, version) pairs, duplicates included; safe to
    call from the consumer's thread while a test reads it."""

    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, envelope: Envelope) -> None:
        with self.lock:
            self.items.append((envelope.entity_id, envelope.entity_version))

    def distinct(self) -> set[tuple[str, int]]:
        with self.lock:
            return set(self.items)

    def count(self) -> int:
        with self.lock:
            return len(self.items)


def unpublished(database_url: str) -> int:
    """Outbox rows the relay has not marked published yet."""
    with psycopg.connect(database_url) as conn:
        return backlog(conn)[0]
