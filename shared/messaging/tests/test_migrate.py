"""Integration: databases and migrations made by processes that start at the same moment."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from psycopg import sql
from servicekit.migrate import ensure_database

pytestmark = pytest.mark.integration


def test_processes_starting_together_create_a_database_once_and_none_fails(servers):
    name = f"together_{uuid.uuid4().hex[:10]}"
    url = servers.database.rsplit("/", 1)[0] + f"/{name}"
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def create() -> None:
        start.wait()
        try:
            ensure_database(url)
        except BaseException as exc:  # the assertion below names it
            errors.append(exc)

    workers = [threading.Thread(target=create) for _ in range(8)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == []
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0] == name
    finally:
        with psycopg.connect(servers.database, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
