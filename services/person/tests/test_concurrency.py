"""Integration: concurrent writes to PgStore keep versions gapless and leave no orphan item."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from decimal import Decimal

import psycopg
import pytest
from messaging import Envelope, decode
from person.errors import NotFound, Unprocessable
from person.store import PgStore

pytestmark = pytest.mark.integration

CPF = "11111"
WORKERS = 16


def create(store: PgStore, cpf: str = CPF) -> None:
    store.create_person(
        {
            "cpf": cpf,
            "name": "abc",
            "address": "abc",
            "date_of_birth": date(2019, 6, 15),
            "email": None,
        },
        None,
    )


def events(database_url: str) -> list[Envelope]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT body FROM messaging_outbox ORDER BY id").fetchall()
    return [decode(body) for (body,) in rows]


def item_rows(database_url: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        return [str(r[0]) for r in conn.execute("SELECT id FROM item").fetchall()]


def test_concurrent_updates_of_one_person_get_versions_one_to_51_without_gap_or_duplicate(
    pg_store, person_db
):
    create(pg_store)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(
            pool.map(
                lambda n: pg_store.update_person(CPF, {"name": f"name-{n}"}, f"u{n}"), range(50)
            )
        )

    person_events = [e for e in events(person_db) if e.entity == "person"]
    versions = [e.entity_version for e in person_events]
    assert sorted(versions) == list(range(1, 52))
    assert versions == sorted(versions)  # the outbox holds them in commit order, too
    last = max(person_events, key=lambda e: e.entity_version)
    assert last.event_type == "person.updated"
    assert pg_store.get_person(CPF)["name"] == last.data["name"]
    assert {e.data["name"] for e in person_events[1:]} == {f"name-{n}" for n in range(50)}


def test_items_added_in_parallel_to_one_person_each_get_one_created_event_at_version_1(
    pg_store, person_db
):
    create(pg_store)

    with ThreadPoolExecutor(WORKERS) as pool:
        added = list(
            pool.map(
                lambda n: pg_store.add_item(CPF, "income", f"t{n}", Decimal(n), None), range(50)
            )
        )

    created = [e for e in events(person_db) if e.change == "created" and e.entity != "person"]
    rows = item_rows(person_db)
    assert len(rows) == 50
    assert len(created) == 50
    assert sorted(e.entity_id for e in created) == sorted(rows)
    assert sorted(str(i["id"]) for i in added) == sorted(rows)
    assert {e.entity_version for e in created} == {1}
    assert len(pg_store.get_person(CPF)["incomes"]) == 50


def test_items_added_in_parallel_past_the_cap_stop_exactly_at_it(pg_store, person_db):
    pg_store.items_per_person_max = 10
    create(pg_store)

    def add(n: int) -> bool:
        try:
            pg_store.add_item(CPF, "income", f"t{n}", Decimal(n), None)
        except Unprocessable:
            return False
        return True

    with ThreadPoolExecutor(WORKERS) as pool:
        added = list(pool.map(add, range(40)))

    created = [e for e in events(person_db) if e.change == "created" and e.entity != "person"]
    assert added.count(True) == 10
    assert len(item_rows(person_db)) == 10
    assert len(created) == 10


@pytest.mark.parametrize("round_", range(3))
def test_items_added_while_the_person_is_deleted_leave_no_row_and_no_orphan_event(
    pg_store, person_db, round_
):
    """Adders keep adding until the person is gone (or for a while); the deletion joins them."""
    create(pg_store)
    adders, attempts = 8, 40
    barrier = threading.Barrier(adders + 1)
    first_added = threading.Event()

    def add(n: int) -> list[str]:
        added: list[str] = []
        barrier.wait()
        for k in range(attempts):
            try:
                item = pg_store.add_item(CPF, "asset", f"t{n}-{k}", Decimal(k), None)
            except NotFound:  # the deletion committed
                break
            added.append(str(item["id"]))
            first_added.set()
        return added

    def delete() -> None:
        barrier.wait()
        assert first_added.wait(30), "no item was added"
        pg_store.delete_person(CPF, None)

    with ThreadPoolExecutor(adders + 1) as pool:
        deletion = pool.submit(delete)
        futures = [pool.submit(add, n) for n in range(adders)]
        deletion.result(timeout=120)
        returned = {item_id for f in futures for item_id in f.result(timeout=120)}

    assert returned
    assert item_rows(person_db) == []
    stream = events(person_db)
    created = {e.entity_id for e in stream if e.event_type == "asset.created"}
    deleted = {e.entity_id for e in stream if e.event_type == "asset.deleted"}
    assert created == returned
    assert created == deleted, "an item created without a deletion event would be an orphan"
    assert [e.event_type for e in stream].count("person.deleted") == 1
    assert stream[-1].event_type == "person.deleted"  # nothing was added after the deletion
    with pytest.raises(NotFound):
        pg_store.get_person(CPF)


def test_a_person_deletion_is_not_starved_by_a_steady_stream_of_item_additions(pg_store):
    """FOR KEY SHARE lockers that overlap one another never leave the FOR UPDATE a gap.

    PostgreSQL grants a KEY SHARE row lock at once while other KEY SHARE holders exist, even
    with a FOR UPDATE waiting, so DELETE /person waits as long as item writes keep overlapping.
    """
    create(pg_store)
    adders = WORKERS
    stop = threading.Event()
    first_added = threading.Event()
    deleted = threading.Event()

    def add(n: int) -> int:
        count = 0
        while not stop.is_set():
            try:
                pg_store.add_item(CPF, "asset", f"t{n}", Decimal(1), None)
            except NotFound:
                break
            count += 1
            first_added.set()
        return count

    def delete() -> None:
        pg_store.delete_person(CPF, None)
        deleted.set()

    with ThreadPoolExecutor(adders + 1) as pool:
        futures = [pool.submit(add, n) for n in range(adders)]
        try:
            assert first_added.wait(30), "no item was added"
            deletion = pool.submit(delete)
            finished_in_time = deleted.wait(5)
        finally:
            stop.set()
        deletion.result(timeout=120)
        added = sum(f.result(timeout=120) for f in futures)

    assert finished_in_time, (
        f"DELETE of the person waited more than 5s behind {added} concurrent item additions"
    )
