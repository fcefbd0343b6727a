"""The relay's marker: confirmed rows gathered on a linger are marked by one statement, and
stopping marks what was confirmed at once."""

from __future__ import annotations

import threading

import psycopg
import pytest
from messaging import Outbox, RelaySettings
from messaging.relay import _Marker

pytestmark = pytest.mark.integration


class Loop:
    """The I/O loop as the marker sees it: callbacks run on the marker's thread, recorded."""

    def __init__(self) -> None:
        self.marked: list[list[int]] = []
        self.errors: list[BaseException] = []
        self.called = threading.Event()

    def add_callback_threadsafe(self, callback) -> None:
        callback()
        self.called.set()


class Conn:
    def __init__(self) -> None:
        self.ioloop = Loop()


def rows(db: str, n: int) -> list[int]:
    outbox = Outbox("test")
    with psycopg.connect(db) as conn, conn.cursor() as cur:
        for i in range(n):
            outbox.add(cur, event_type="thing.updated", entity_id=f"e{i}", data={"i": i})
        return [r[0] for r in conn.execute("SELECT id FROM messaging_outbox ORDER BY id")]


def published(db: str) -> dict[int, object]:
    with psycopg.connect(db) as conn:
        return dict(conn.execute("SELECT id, published_at FROM messaging_outbox").fetchall())


def marker(db: str, **settings) -> tuple[_Marker, Loop]:
    conn = Conn()
    loop = conn.ioloop
    made = _Marker(
        RelaySettings(db, "amqp://unused", "unused", **settings),
        conn,
        loop.marked.append,
        loop.errors.append,
    )
    made.start()
    return made, loop


def test_rows_confirmed_one_by_one_within_the_linger_are_marked_by_one_statement(producer_db):
    a, b, c, d = rows(producer_db, 4)
    mark, loop = marker(producer_db, mark_linger=3600.0, mark_rows=3)
    try:
        for row in (a, b, c):  # three confirms, whenever they come: the third fills the batch
            mark.submit([row])
        assert loop.called.wait(30), "the marker did not mark three rows"
        assert loop.marked == [[a, b, c]]
        at = published(producer_db)
        assert at[a] is not None and at[a] == at[b] == at[c]  # one transaction's now()
        assert at[d] is None  # never confirmed: never marked
    finally:
        mark.stop()
    assert loop.errors == []


def test_stopping_marks_what_was_confirmed_without_waiting_for_the_linger(producer_db):
    a, b = rows(producer_db, 2)
    mark, loop = marker(producer_db, mark_linger=3600.0)
    mark.submit([a])
    mark.stop()  # joins for at most 30 s: it returned because the marker marked and ended
    assert not mark._thread.is_alive()
    assert loop.marked == [[a]]
    at = published(producer_db)
    assert at[a] is not None and at[b] is None
