"""Outbox.add_many writes what the same calls to Outbox.add would."""

from __future__ import annotations

import psycopg
import pytest
from messaging import Outbox, decode
from messaging.outbox import OutboxBusy, position

pytestmark = pytest.mark.integration


def test_add_many_continues_versions_and_writes_one_row_per_entity(producer_db):
    outbox = Outbox("test")
    with psycopg.connect(producer_db) as conn:
        with conn.transaction(), conn.cursor() as cur:
            outbox.add(cur, event_type="thing.created", entity_id="b", data={"n": 0})
        with conn.transaction(), conn.cursor() as cur:
            made = outbox.add_many(
                cur,
                event_type="thing.updated",
                data={"b": {"n": 1}, "a": {"n": 2}},
                correlation_id="bulk-1",
            )
        assert [(e.entity_id, e.entity_version) for e in made] == [("a", 1), ("b", 2)]
        with conn.transaction(), conn.cursor() as cur:
            assert outbox.add_many(cur, event_type="thing.updated", data={}) == []
        rows = conn.execute(
            "SELECT entity_id, entity_version, correlation_id, body FROM messaging_outbox "
            "ORDER BY id"
        ).fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("b", 1, None),
        ("a", 1, "bulk-1"),
        ("b", 2, "bulk-1"),
    ]
    assert decode(rows[2][3]).data == {"n": 1}


def test_add_many_rolls_back_with_its_transaction(producer_db):
    outbox = Outbox("test")
    with psycopg.connect(producer_db) as conn:
        with pytest.raises(RuntimeError), conn.transaction(), conn.cursor() as cur:
            outbox.add_many(cur, event_type="thing.created", data={"x": {}})
            raise RuntimeError("the write failed")
        with conn.transaction(), conn.cursor() as cur:
            made = outbox.add_many(cur, event_type="thing.created", data={"x": {}})
        assert made[0].entity_version == 1  # the rolled-back number was given back
        assert conn.execute("SELECT count(*) FROM messaging_outbox").fetchone()[0] == 1


def test_a_position_is_never_taken_while_a_write_to_the_outbox_is_open(producer_db):
    outbox = Outbox("test")
    with psycopg.connect(producer_db) as slow, psycopg.connect(producer_db) as fast:
        with slow.cursor() as cur:  # takes id 1, and stays open
            outbox.add(cur, event_type="thing.created", entity_id="slow", data={})
        with fast.transaction(), fast.cursor() as cur:  # takes id 2, committed
            outbox.add(cur, event_type="thing.created", entity_id="fast", data={})
        with psycopg.connect(producer_db, autocommit=True) as reader:
            # The highest id seen now is 2, yet id 1 may still commit: no position yet.
            with pytest.raises(OutboxBusy):
                position(reader, wait=0.2)
            slow.commit()
            assert position(reader) == 2
            with fast.transaction(), fast.cursor() as cur:
                outbox.add(cur, event_type="thing.updated", entity_id="fast", data={})
            assert position(reader) == 3


def test_a_position_needs_a_connection_outside_a_transaction(producer_db):
    with psycopg.connect(producer_db) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(ValueError, match="outside a transaction"):
            position(conn)
