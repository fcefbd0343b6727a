"""Bulk registration: POST /person/bulk stores an import, the importer registers its items.

Real PostgreSQL; the importer runs in a thread (messaging.testing.running) or as the
`python -m person.importer` process when the test kills it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from messaging.testing import running, wait_until
from person.app import create_app
from person.config import PersonConfig
from person.imports import Importer, ImporterSettings
from person.migrate import migrate_database
from person.store import PgStore
from psycopg_pool import ConnectionPool

pytestmark = pytest.mark.integration

BULK_MAX_BYTES = 1024 * 1024
BULK_MAX_ITEMS = 5_000


@pytest.fixture
def bulk_config(config, person_db) -> PersonConfig:
    """The API's limits made small enough to cross in a test (MAX_BODY_BYTES stays 16 KiB)."""
    return config.model_copy(
        update={
            "person_database_url": person_db,
            "bulk_max_bytes": BULK_MAX_BYTES,
            "bulk_max_items": BULK_MAX_ITEMS,
        }
    )


@pytest.fixture
def client(bulk_config, person_db):
    with ConnectionPool(person_db, min_size=1, max_size=4) as pool:
        yield create_app(bulk_config, store=PgStore(pool)).test_client()


@pytest.fixture
def importer(person_db) -> Importer:
    return Importer(ImporterSettings(person_db, batch_size=200, poll_interval=0.2))


def person(index: int, **changes) -> dict:
    return {
        "cpf": str(10_000_000_000 + index),
        "name": f"Person {index}",
        "address": f"Rua {index}, Recife",
        "date_of_birth": "1990-04-12",
        "email": f"p{index}@example.com",
        **changes,
    }


def post_bulk(client, items, key: str | None = None, headers: dict | None = None):
    headers = {**(headers or {}), **({"Idempotency-Key": key} if key else {})}
    return client.post("/person/bulk", json=items, headers=headers)


def status_of(client, import_id: str, **params) -> dict:
    answer = client.get(f"/imports/{import_id}", query_string=params)
    assert answer.status_code == 200, answer.json
    return answer.json


def done(client, import_id: str) -> dict | None:
    found = status_of(client, import_id)
    return found if found["status"] == "done" else None


def query(url: str, sql: str, *params) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def created_events(url: str) -> dict[str, int]:
    """person.created events per CPF."""
    rows = query(
        url,
        "SELECT entity_id, count(*) FROM messaging_outbox "
        "WHERE event_type = 'person.created' GROUP BY entity_id",
    )
    return dict(rows)


# -- the report --------------------------------------------------------------------------------
INVALID = [  # (change to a valid item, the reasons the import must report)
    ({"name": None}, {"name": ["Input should be a valid string"]}),
    ({"date_of_birth": "2999-01-01"}, {"date_of_birth": ["must not be in the future"]}),
    (
        {"cpf": "12a"},
        {"cpf": ["must contain 1 to 14 digits (dots, dashes and spaces are ignored)"]},
    ),
    ({"nickname": "Zé"}, {"nickname": ["unknown field"]}),
    ({"email": "not-an-address"}, None),  # the e-mail validator's own wording
]


def test_an_import_reports_exactly_its_invalid_and_duplicate_items(client, importer, person_db):
    existing = [person(900_000 + n) for n in range(50)]
    for body in existing:
        assert client.post("/person", json=body).status_code == 201
    items, expected = [], {}
    for i in range(2_000):
        if i % 10 == 3:  # 10% invalid
            change, reasons = INVALID[(i // 10) % len(INVALID)]
            items.append(person(i, **change))
            expected[i] = reasons
        elif i % 20 == 7:  # 5% duplicates: of people registered before, of earlier items
            k = i // 20
            if k % 2 == 0:
                twin = existing[(k // 2) % len(existing)]
            elif k % 4 == 1 and i > 501:
                twin = items[i - 501]  # in an earlier batch
            else:
                twin = items[i - 5]  # in the same batch (mostly)
            items.append({**twin, "name": f"Twin {i}"})
            expected[i] = {"cpf": [f"a person with CPF {twin['cpf']} already exists"]}
        else:
            items.append(person(i))
    assert sum(1 for i in expected if i % 10 == 3) == 200
    assert sum(1 for i in expected if i % 20 == 7) == 100

    answer = post_bulk(client, items, headers={"X-Request-Id": "the-request"})
    assert answer.status_code == 202, answer.json
    import_id = answer.json["id"]
    assert answer.headers["Location"] == f"/imports/{import_id}"
    assert answer.json == {"id": import_id, "status": "pending", "total": 2_000}

    with running(importer):
        report = wait_until(lambda: done(client, import_id), timeout=60, what="import done")
    report = status_of(client, import_id, limit=5_000)
    assert (report["total"], report["processed"]) == (2_000, 2_000)
    assert (report["succeeded"], report["failed"]) == (1_700, 300)
    assert report["finished_at"] is not None
    failures = {f["index"]: f["errors"] for f in report["failures"]}
    assert sorted(failures) == sorted(expected)
    for index, reasons in expected.items():
        if reasons is None:
            assert list(failures[index]) == ["email"], failures[index]
        else:
            assert failures[index] == reasons, index
    assert [f["index"] for f in status_of(client, import_id, limit=3)["failures"]] == [3, 7, 13]

    registered = {row[0] for row in query(person_db, "SELECT cpf FROM person")}
    wanted = {items[i]["cpf"] for i in range(2_000) if i not in expected}
    assert registered == wanted | {p["cpf"] for p in existing}
    assert len(wanted) == 1_700
    events = created_events(person_db)
    assert set(events) == registered and set(events.values()) == {1}
    correlations = query(
        person_db,
        "SELECT DISTINCT correlation_id FROM messaging_outbox WHERE entity_id = ANY(%s)",
        list(wanted),
    )
    assert correlations == [(import_id,)]
    # A twin never overwrote the first one.
    assert query(person_db, "SELECT count(*) FROM person WHERE name LIKE 'Twin%%'") == [(0,)]
    assert query(person_db, "SELECT count(*) FROM import_items") == [(0,)]  # dropped when done


def test_an_item_the_database_refuses_fails_alone_and_the_rest_of_its_batch_registers(
    client, importer, person_db
):
    # A rule of the database's that validation does not know: the batch is redone with a
    # savepoint per person, so that it does not fail forever for one of them.
    with psycopg.connect(person_db) as conn:
        conn.execute("ALTER TABLE person ADD CONSTRAINT not_refused CHECK (name <> 'Refused')")
    items = [person(i) for i in range(5)] + [person(1, name="Twin")]
    items[2] = person(2, name="Refused")
    import_id = post_bulk(client, items, headers={"X-Request-Id": "careful"}).json["id"]

    with running(importer):
        report = wait_until(lambda: done(client, import_id), what="import done")

    assert (report["succeeded"], report["failed"]) == (4, 2)
    failures = {f["index"]: f["errors"] for f in report["failures"]}
    assert set(failures) == {2, 5}
    assert failures[2]["body"][0].startswith("refused by the database: new row for relation")
    assert failures[5] == {"cpf": [f"a person with CPF {items[1]['cpf']} already exists"]}
    events = created_events(person_db)
    assert set(events) == {items[i]["cpf"] for i in (0, 1, 3, 4)}
    assert set(events.values()) == {1}
    assert query(person_db, "SELECT DISTINCT correlation_id FROM messaging_outbox") == [
        (import_id,)
    ]


def test_an_idempotency_key_returns_the_same_import_and_stores_nothing_new(client, person_db):
    first = post_bulk(client, [person(1), person(2)], key="batch-2026-11-23")
    again = post_bulk(client, [person(1), person(2)], key="batch-2026-11-23")
    other_body = post_bulk(client, [person(3)], key="batch-2026-11-23")
    assert first.status_code == again.status_code == other_body.status_code == 202
    assert first.json == again.json == other_body.json
    assert first.headers["Location"] == again.headers["Location"] == other_body.headers["Location"]
    assert query(person_db, "SELECT count(*) FROM imports") == [(1,)]
    assert query(person_db, "SELECT count(*) FROM import_items") == [(2,)]
    fresh = post_bulk(client, [person(1)], key="another-key")
    unkeyed = [post_bulk(client, [person(1)]).json["id"] for _ in range(2)]
    assert len({first.json["id"], fresh.json["id"], *unkeyed}) == 4


def test_ndjson_is_an_import_like_an_array(client, importer, person_db):
    lines = [json.dumps(person(i)) for i in range(3)]
    body = "\n".join([lines[0], "", lines[1], json.dumps({"cpf": "1"}), lines[2]]) + "\n"
    answer = client.post(
        "/person/bulk", data=body, headers={"Content-Type": "application/x-ndjson"}
    )
    assert answer.status_code == 202, answer.json
    assert answer.json["total"] == 4
    with running(importer):
        report = wait_until(lambda: done(client, answer.json["id"]), what="import done")
    assert (report["succeeded"], report["failed"]) == (3, 1)
    assert report["failures"][0]["index"] == 2
    assert set(report["failures"][0]["errors"]) == {"name", "address", "date_of_birth"}


BIG = [person(1, address="x" * BULK_MAX_BYTES)]


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"data": "[]", "content_type": "text/plain"}, 415, "must be a JSON array"),
        ({"data": "", "content_type": "application/json"}, 400, "the body is empty"),
        ({"data": "[{]", "content_type": "application/json"}, 400, "not valid JSON"),
        ({"data": "[NaN]", "content_type": "application/json"}, 400, "not valid JSON"),
        (
            {"data": '{"a": 1}\n{', "content_type": "application/x-ndjson"},
            400,
            "line 2",
        ),
        ({"json": person(1)}, 400, "must be a JSON array"),
        ({"json": []}, 422, "no people"),
        ({"json": [person(1), 5, [], "x"]}, 422, "3 items are not objects"),
        ({"json": BIG}, 413, "the body is too large"),
        ({"json": [{}] * (BULK_MAX_ITEMS + 1)}, 413, "too many people: more than 5000"),
        ({"json": [person(1)], "headers": {"Idempotency-Key": "k" * 201}}, 400, "1 to 200"),
    ],
    ids=[
        "not-json",
        "empty",
        "malformed",
        "nan",
        "malformed-ndjson",
        "object",
        "no-items",
        "not-objects",
        "too-large",
        "too-many",
        "long-key",
    ],
)
def test_bulk_bodies_that_are_not_an_import_are_refused(client, person_db, kwargs, status, message):
    answer = client.post("/person/bulk", **kwargs)
    assert answer.status_code == status, answer.json
    assert set(answer.json) == {"message", "errors"}
    assert message in answer.json["message"]
    if status == 422 and "objects" in message:
        assert answer.json["errors"] == {str(i): ["must be a JSON object"] for i in (1, 2, 3)}
    assert query(person_db, "SELECT count(*) FROM imports") == [(0,)]


def test_only_the_bulk_route_takes_bodies_past_the_apis_limit(client):
    items = [person(i) for i in range(1_000)]  # about 130 KiB; MAX_BODY_BYTES is 16 KiB
    assert len(json.dumps(items)) > 100 * 1024
    assert post_bulk(client, items).status_code == 202
    padded = person(1, name="x" * 20_000)
    assert client.post("/person", json=padded).status_code == 413


def test_an_unknown_or_malformed_import_id_is_404(client):
    for import_id in ("00000000-0000-0000-0000-000000000000", "not-a-uuid", "1"):
        answer = client.get(f"/imports/{import_id}")
        assert answer.status_code == 404
        assert set(answer.json) == {"message", "errors"}
    created = post_bulk(client, [person(1)]).json["id"]
    for limit in ("-1", "²", "٣", "10001"):
        answer = client.get(f"/imports/{created}", query_string={"limit": limit})
        assert answer.status_code == 422, limit


@pytest.mark.parametrize(
    ("data", "content_type", "message"),
    [
        ("\n".join(["{}"] * (BULK_MAX_ITEMS + 1)), "application/x-ndjson", "too many people"),
        ("[" + ",".join(["{}"] * (BULK_MAX_ITEMS + 1)) + "]", "application/json", "too many"),
        ('[{"cpf": 1}] trailing', "application/json", "trailing garbage"),
        ('[{"cpf": 1},]', "application/json", "not valid JSON"),
        ('[{"cpf": 1} {"cpf": 2}]', "application/json", "not valid JSON"),
    ],
    ids=["ndjson-over-count", "array-over-count", "trailing", "trailing-comma", "no-comma"],
)
def test_a_bulk_body_is_refused_as_soon_as_it_is_known_to_be_wrong(
    client, person_db, data, content_type, message
):
    answer = client.post("/person/bulk", data=data, content_type=content_type)
    assert 400 <= answer.status_code < 500 and message in answer.json["message"], answer.json
    assert query(person_db, "SELECT count(*) FROM imports") == [(0,)]


def test_one_key_cannot_queue_more_than_a_few_imports(bulk_config, person_db):
    with ConnectionPool(person_db, min_size=1, max_size=4) as pool:
        app = create_app(
            bulk_config.model_copy(update={"imports_queued_per_key": 2}), PgStore(pool)
        )
        client = app.test_client()
        assert [post_bulk(client, [person(n)]).status_code for n in range(3)] == [202, 202, 429]
        refused = post_bulk(client, [person(9)])
        assert refused.headers["Retry-After"] and "not done yet" in refused.json["message"]


def test_a_retry_racing_its_original_gets_the_original_even_with_the_key_at_its_limit(
    bulk_config, person_db
):
    with ConnectionPool(person_db, min_size=1, max_size=4) as pool:
        config = bulk_config.model_copy(update={"imports_queued_per_key": 3})
        app = create_app(config, PgStore(pool))
        for n in range(2):  # two imports queued: the original makes three, the limit
            assert post_bulk(app.test_client(), [person(n)]).status_code == 202
        answers: list = []

        def send() -> None:
            answers.append(post_bulk(app.test_client(), [person(5)], key="same"))

        requests = [threading.Thread(target=send) for _ in range(2)]
        # The owner's lock, held here: both find no import with the key, then wait for it.
        with psycopg.connect(person_db) as lock:
            owner = ""  # API keys off
            lock.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('imports:' || %s, 0))", (owner,)
            )
            for thread in requests:
                thread.start()
            wait_until(lambda: waiting_for_a_lock(person_db) == 2, what="both at the lock")
            lock.rollback()  # lets them go, one after the other
        for thread in requests:
            thread.join(30)
        assert [answer.status_code for answer in answers] == [202, 202], [a.json for a in answers]
        assert answers[0].json == answers[1].json
        later = post_bulk(app.test_client(), [person(5)], key="same")
        assert later.json == answers[0].json


OWNERS_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('imports:' || %s, 0))"


def waiting_for_a_lock(url: str) -> int:
    [(waiting,)] = query(
        url,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    return waiting


def test_an_import_keeps_a_bounded_number_of_failures_but_counts_them_all(
    client, importer, monkeypatch
):
    from person import imports

    monkeypatch.setattr(imports, "MAX_FAILURES_KEPT", 7)
    created = post_bulk(client, [{"cpf": "x"}] * 20).json["id"]
    with running(importer):
        report = wait_until(lambda: done(client, created), what="the import done")
    assert (report["failed"], len(report["failures"])) == (20, 7)


def test_the_api_answers_202_at_once_without_a_worker(client, person_db):
    items = [person(i) for i in range(BULK_MAX_ITEMS)]
    started = time.perf_counter()
    answer = post_bulk(client, items)
    took = time.perf_counter() - started
    assert answer.status_code == 202
    assert took < 5, f"storing {len(items)} items took {took:.1f}s"
    report = status_of(client, answer.json["id"])
    assert (report["status"], report["processed"], report["failures"]) == ("pending", 0, [])
    assert query(person_db, "SELECT count(*) FROM import_items") == [(BULK_MAX_ITEMS,)]
    assert query(person_db, "SELECT count(*) FROM person") == [(0,)]


def test_two_importers_share_the_work_without_duplicates(client, person_db):
    payloads = ([person(n * 1_000 + i) for i in range(600)] for n in (1, 2))
    ids = [post_bulk(client, items).json["id"] for items in payloads]
    workers = [
        Importer(ImporterSettings(person_db, batch_size=50, poll_interval=0.1)) for _ in range(2)
    ]
    with running(workers[0]), running(workers[1]):
        for import_id in ids:
            report = wait_until(lambda i=import_id: done(client, i), timeout=60, what="done")
            assert (report["succeeded"], report["failed"]) == (600, 0)
    events = created_events(person_db)
    assert len(events) == 1_200 and set(events.values()) == {1}


def test_the_importer_wakes_on_a_new_import_without_waiting_for_its_poll(client, person_db):
    listening = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query = 'LISTEN person_imports'"
    )
    sleepy = Importer(ImporterSettings(person_db, poll_interval=60))
    with running(sleepy):
        wait_until(lambda: query(person_db, listening) == [(1,)], what="the importer listening")
        import_id = post_bulk(client, [person(1)]).json["id"]
        wait_until(lambda: done(client, import_id), timeout=10, what="woken by NOTIFY")


# -- a killed worker ---------------------------------------------------------------------------
@pytest.fixture
def importer_process(person_db) -> Iterator:
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        env = {**os.environ, "PERSON_DATABASE_URL": person_db, "IMPORT_BATCH_SIZE": "50"}
        process = subprocess.Popen([sys.executable, "-m", "person.importer"], env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_a_worker_killed_midway_resumes_without_duplicates(client, person_db, importer_process):
    total = 5_000
    items = [person(i) for i in range(total)]
    items[10] = person(10, name="")  # one failure, so the failure table is resumed too
    import_id = post_bulk(client, items).json["id"]

    first = importer_process()
    report = wait_until(
        lambda: (r := status_of(client, import_id))["processed"] > 0 and r,
        timeout=30,
        interval=0.005,
        what="the first batches",
    )
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    report = status_of(client, import_id)
    assert 0 < report["processed"] < total, "the import finished before the kill; make it larger"
    assert report["status"] == "running"
    assert query(person_db, "SELECT count(*) FROM person") == [(report["succeeded"],)]

    second = importer_process()
    report = wait_until(lambda: done(client, import_id), timeout=60, what="import done")
    second.send_signal(signal.SIGTERM)
    assert second.wait(15) == 0
    assert (report["processed"], report["succeeded"], report["failed"]) == (total, total - 1, 1)
    assert [f["index"] for f in report["failures"]] == [10]
    assert query(person_db, "SELECT count(*) FROM person") == [(total - 1,)]
    events = created_events(person_db)
    assert len(events) == total - 1 and set(events.values()) == {1}


def test_the_imports_migration_applies_to_an_existing_database(make_database):
    url = make_database("person")
    migrate_database(url)
    with psycopg.connect(url) as conn:  # a database as it was before imports existed
        conn.execute("DROP TABLE import_failures, import_items, imports")
        conn.execute("DELETE FROM schema_migrations WHERE version = '003_imports'")
    result = subprocess.run(
        [sys.executable, "-m", "person.migrate"],
        env={**os.environ, "PERSON_DATABASE_URL": url},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "003_imports" in result.stdout
    assert migrate_database(url) == []
    assert query(url, "SELECT count(*) FROM imports") == [(0,)]


# -- memory ------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/json"])
def test_a_bulk_body_is_read_without_holding_it_whole(bulk_config, person_db, content_type):
    """An 8 MiB body of 20,000 people costs the API less than the body itself, beyond the copy
    of it the test client holds (person.bulk: each item parsed alone, spooled to a file); and the
    key's room for an import is checked before a byte of it is read."""
    import io
    import tracemalloc

    config = bulk_config.model_copy(
        update={
            "bulk_max_bytes": 9 * 1024 * 1024,
            "bulk_max_items": 20_000,
            "imports_queued_per_key": 3,
        }
    )
    pad = "x" * 300
    items = [json.dumps(person(i, address=pad)) for i in range(20_000)]
    raw = ("\n".join(items) if "ndjson" in content_type else "[" + ",".join(items) + "]").encode()
    assert len(raw) > 7 * 1024 * 1024
    with ConnectionPool(person_db, min_size=1, max_size=4) as pool:
        client = create_app(config, store=PgStore(pool)).test_client()
        body = io.BytesIO(raw)
        tracemalloc.start()
        try:
            answer = client.post("/person/bulk", data=body, content_type=content_type)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert answer.status_code == 202, answer.json
        assert answer.json["total"] == 20_000
        assert peak < len(raw), f"peak {peak / 2**20:.1f} MiB for a {len(raw) / 2**20:.1f} MiB body"

        class Unread(io.BytesIO):
            def read(self, *args):  # a quota refusal must not read the body
                raise AssertionError("the body was read")

            readinto = readline = read

        with psycopg.connect(person_db) as conn:  # the key's imports at the limit (3)
            conn.execute("UPDATE imports SET status = 'pending'")
            for _ in range(2):
                conn.execute(
                    "INSERT INTO imports (id, owner, total) "
                    "SELECT gen_random_uuid(), owner, 1 FROM imports LIMIT 1"
                )
        refused = client.post(
            "/person/bulk",
            input_stream=Unread(raw),
            content_length=len(raw),
            content_type=content_type,
        )
        assert refused.status_code == 429, refused.json
