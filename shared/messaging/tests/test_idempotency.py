"""Integration: the idempotent apply helpers against the real PostgreSQL and Redis.

Duplicates, replays and reordering must converge to the state of in-order delivery.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from messaging.idempotency import Inbox, RedisVersionGate, upsert_if_newer
from psycopg import sql
from psycopg.types.json import Jsonb

pytestmark = pytest.mark.integration

TABLE_SQL = """
CREATE TABLE {} (
    entity_id text    PRIMARY KEY,
    version   integer NOT NULL,
    deleted   boolean NOT NULL DEFAULT false,
    data      jsonb
)
"""


# -- PostgreSQL --------------------------------------------------------------------------------
@pytest.fixture
def db(make_database) -> Iterator[psycopg.Connection]:
    with psycopg.connect(make_database("idem"), autocommit=True) as conn:
        for table in ("things", "things_in_order"):
            conn.execute(sql.SQL(TABLE_SQL).format(sql.Identifier(table)))
        Inbox.install(conn)
        yield conn


def apply(
    conn: psycopg.Connection, entity_id: str, version: int, data: Any, table: str = "things"
) -> bool:
    """Apply one event in its own transaction, as a handler would; None data is a deletion."""
    row = {
        "entity_id": entity_id,
        "version": version,
        "deleted": data is None,
        "data": None if data is None else Jsonb(data),
    }
    with conn.transaction(), conn.cursor() as cur:
        return upsert_if_newer(cur, table, ["entity_id"], row)


def stored(conn: psycopg.Connection, entity_id: str, table: str = "things") -> tuple | None:
    return conn.execute(
        sql.SQL("SELECT version, deleted, data FROM {} WHERE entity_id = %s").format(
            sql.Identifier(table)
        ),
        (entity_id,),
    ).fetchone()


def whole_table(conn: psycopg.Connection, table: str) -> list[tuple]:
    return conn.execute(
        sql.SQL("SELECT entity_id, version, deleted, data FROM {} ORDER BY entity_id").format(
            sql.Identifier(table)
        )
    ).fetchall()


def test_upsert_inserts_a_new_entity_and_applies_each_newer_version(db):
    assert apply(db, "a", 1, {"n": 1})
    assert apply(db, "a", 2, {"n": 2})
    assert apply(db, "a", 5, {"n": 5})  # a gap is fine: newer is newer

    assert stored(db, "a") == (5, False, {"n": 5})


@pytest.mark.parametrize("late_version", [3, 2, 1])
def test_upsert_ignores_an_equal_or_older_version(db, late_version):
    apply(db, "a", 3, {"n": 3})

    assert not apply(db, "a", late_version, {"n": "late"})

    assert stored(db, "a") == (3, False, {"n": 3})


def test_upsert_compares_versions_as_numbers_not_text(db):
    apply(db, "a", 10, {"n": 10})

    assert not apply(db, "a", 9, {"n": 9})
    assert stored(db, "a") == (10, False, {"n": 10})


def test_a_tombstone_is_not_overwritten_by_a_late_older_version(db):
    apply(db, "a", 1, {"n": 1})
    assert apply(db, "a", 4, None)

    assert not apply(db, "a", 3, {"n": 3})
    assert not apply(db, "a", 4, {"n": "same version"})

    assert stored(db, "a") == (4, True, None)


def test_a_tombstone_that_arrives_first_still_wins_over_the_earlier_versions(db):
    assert apply(db, "a", 3, None)

    for version in (1, 2):
        assert not apply(db, "a", version, {"n": version})

    assert stored(db, "a") == (3, True, None)


def events(entities: int, versions: int) -> list[tuple[str, int, Any]]:
    """Every version of every entity; some entities end with a deletion."""
    made = []
    for e in range(entities):
        entity_id = f"e{e:02d}"
        for v in range(1, versions + 1):
            deleted = e % 4 == 0 and v == versions
            made.append((entity_id, v, None if deleted else {"entity": entity_id, "v": v}))
    return made


def test_every_version_delivered_twice_in_shuffled_order_gives_the_in_order_table(db):
    in_order = events(entities=20, versions=10)  # 200 versions of 20 entities
    shuffled = in_order * 2
    random.Random(20240501).shuffle(shuffled)

    for entity_id, version, data in in_order:
        assert apply(db, entity_id, version, data, table="things_in_order")
    written = sum(apply(db, entity_id, version, data) for entity_id, version, data in shuffled)

    assert whole_table(db, "things") == whole_table(db, "things_in_order")
    assert len(whole_table(db, "things")) == 20
    assert 20 <= written <= 200  # each entity written at least once, never more than per version
    assert stored(db, "e00") == (10, True, None)
    assert stored(db, "e01") == (10, False, {"entity": "e01", "v": 10})


def test_the_inbox_claims_an_event_once_and_then_refuses_it(db):
    inbox, event_id = Inbox("score"), uuid.uuid4()

    with db.transaction(), db.cursor() as cur:
        assert inbox.claim(cur, event_id)
    with db.transaction(), db.cursor() as cur:
        assert not inbox.claim(cur, event_id)
    with db.transaction(), db.cursor() as cur:
        assert not inbox.claim(cur, str(event_id))


def test_the_inbox_is_kept_per_consumer(db):
    event_id = uuid.uuid4()

    with db.transaction(), db.cursor() as cur:
        assert Inbox("score").claim(cur, event_id)
        assert Inbox("notifier").claim(cur, event_id)
        assert Inbox("score").claim(cur, uuid.uuid4())


def test_a_claim_in_a_rolled_back_transaction_does_not_count(db):
    inbox, event_id = Inbox("score"), uuid.uuid4()

    with db.transaction(), db.cursor() as cur:
        assert inbox.claim(cur, event_id)
        raise psycopg.Rollback()  # the handler failed after claiming
    with pytest.raises(RuntimeError), db.transaction(), db.cursor() as cur:
        assert inbox.claim(cur, event_id)
        raise RuntimeError("the handler crashed")

    with db.transaction(), db.cursor() as cur:
        assert inbox.claim(cur, event_id)
    with db.transaction(), db.cursor() as cur:
        assert not inbox.claim(cur, event_id)


def test_installing_the_inbox_twice_is_harmless(db):
    event_id = uuid.uuid4()
    with db.transaction(), db.cursor() as cur:
        assert Inbox("score").claim(cur, event_id)

    Inbox.install(db)

    with db.transaction(), db.cursor() as cur:
        assert not Inbox("score").claim(cur, event_id)


# -- Redis -------------------------------------------------------------------------------------
@pytest.fixture
def rds(servers) -> Iterator[tuple[redis.Redis, str]]:
    client = redis.Redis.from_url(servers.redis)
    prefix = f"test:idem:{uuid.uuid4().hex}:"
    try:
        yield client, prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def state(client: redis.Redis, key: str) -> dict[bytes, bytes]:
    return client.hgetall(key)


def test_the_redis_gate_applies_each_newer_version(rds):
    client, prefix = rds
    gate, key = RedisVersionGate(client), f"{prefix}thing:a"

    assert gate.apply(key, 1, '{"n": 1}')
    assert gate.apply(key, 2, '{"n": 2}')
    assert gate.apply(key, 7, '{"n": 7}')

    assert state(client, key) == {b"version": b"7", b"data": b'{"n": 7}', b"deleted": b"0"}


@pytest.mark.parametrize("late_version", [10, 9, 2, 1])
def test_the_redis_gate_ignores_an_equal_or_older_version(rds, late_version):
    client, prefix = rds
    gate, key = RedisVersionGate(client), f"{prefix}thing:a"
    gate.apply(key, 10, '{"n": 10}')

    assert not gate.apply(key, late_version, '{"n": "late"}')

    assert state(client, key) == {b"version": b"10", b"data": b'{"n": 10}', b"deleted": b"0"}


def test_a_redis_tombstone_is_not_overwritten_by_a_late_older_version(rds):
    client, prefix = rds
    gate, key = RedisVersionGate(client), f"{prefix}thing:a"
    gate.apply(key, 1, '{"n": 1}')

    assert gate.apply(key, 4, None)
    assert not gate.apply(key, 3, '{"n": 3}')
    assert not gate.apply(key, 4, '{"n": "same"}')

    assert state(client, key) == {b"version": b"4", b"data": b"", b"deleted": b"1"}


def test_the_redis_gate_works_inside_a_pipeline_client(rds):
    client, prefix = rds
    gate, key = RedisVersionGate(client), f"{prefix}thing:a"

    with client.pipeline(transaction=True) as pipe:
        gate.apply(key, 2, '{"n": 2}', client=pipe)
        gate.apply(key, 1, '{"n": 1}', client=pipe)
        assert pipe.execute() == [1, 0]

    assert state(client, key)[b"version"] == b"2"


def test_redis_versions_delivered_twice_in_shuffled_order_give_the_in_order_state(rds):
    client, prefix = rds
    gate = RedisVersionGate(client)
    in_order = events(entities=20, versions=10)
    shuffled = in_order * 2
    random.Random(7).shuffle(shuffled)

    for entity_id, version, data in in_order:
        gate.apply(f"{prefix}ordered:{entity_id}", version, None if data is None else str(data))
    for entity_id, version, data in shuffled:
        gate.apply(f"{prefix}shuffled:{entity_id}", version, None if data is None else str(data))

    for e in range(20):
        entity_id = f"e{e:02d}"
        assert state(client, f"{prefix}shuffled:{entity_id}") == state(
            client, f"{prefix}ordered:{entity_id}"
        )
    assert state(client, f"{prefix}shuffled:e00")[b"deleted"] == b"1"
