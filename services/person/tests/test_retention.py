"""Integration: the importer's retention deletes finished imports, with their failures, by age."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import psycopg
import pytest
from messaging.testing import wait_until
from person.retention import pruner

pytestmark = pytest.mark.integration


def an_import(conn: psycopg.Connection, status: str, finished_days_ago: float | None) -> str:
    import_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO imports (id, status, total, created_at, finished_at) VALUES "
        "(%(id)s, %(status)s, 2, now() - interval '30 days', "
        "now() - make_interval(secs => %(ago)s))",
        {"id": import_id, "status": status, "ago": (finished_days_ago or 0) * 86_400},
    )
    if finished_days_ago is None:
        conn.execute("UPDATE imports SET finished_at = NULL WHERE id = %s", (import_id,))
    conn.execute(
        "INSERT INTO import_failures (import_id, idx, errors) VALUES (%s, 0, '{}'), (%s, 1, '{}')",
        (import_id, import_id),
    )
    return import_id


def test_finished_imports_older_than_the_retention_go_with_their_failures(config, person_db):
    config = config.model_copy(
        update={"person_database_url": person_db, "import_retention_days": 7, "retention_batch": 2}
    )
    with psycopg.connect(person_db, autocommit=True) as conn:
        old = {an_import(conn, "done", 8) for _ in range(3)}
        recent = an_import(conn, "done", 6)
        unfinished = an_import(conn, "running", None)  # however old: the importer's work

        pruned = pruner(config).run_once()

        left = {str(i) for (i,) in conn.execute("SELECT id FROM imports").fetchall()}
        failures = {str(i) for (i,) in conn.execute("SELECT import_id FROM import_failures")}
    assert pruned == {"finished imports": len(old)}
    assert left == {recent, unfinished}
    assert failures == {recent, unfinished}


def test_the_running_importer_process_prunes_at_start(person_db):
    with psycopg.connect(person_db, autocommit=True) as conn:
        old = an_import(conn, "done", 8)
        recent = an_import(conn, "done", 6)
    env = {**os.environ, "PERSON_DATABASE_URL": person_db, "IMPORT_RETENTION_DAYS": "7"}
    process = subprocess.Popen([sys.executable, "-m", "person.importer"], env=env)
    try:
        wait_until(
            lambda: [(recent,)] == [(str(i),) for (i,) in ids(person_db)],
            timeout=30,
            what=f"import {old} pruned",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0


def ids(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT id FROM imports").fetchall()
