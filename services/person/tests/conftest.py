"""Fixtures of the person service's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from person.app import create_app
from person.config import PersonConfig
from person.memory import MemoryStore
from person.migrate import migrate_database
from person.store import PgStore
from psycopg_pool import ConnectionPool


@pytest.fixture
def person_db(make_database, service_url) -> str:
    """A fresh person database with every migration applied."""
    url = make_database("person")
    migrate_database(url)
    return service_url(url, "person")


@pytest.fixture
def pg_store(person_db) -> Iterator[PgStore]:
    pool = ConnectionPool(person_db, min_size=1, max_size=20, open=True)
    try:
        yield PgStore(pool)
    finally:
        pool.close()


@pytest.fixture
def memory_store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def config(servers) -> PersonConfig:
    return PersonConfig(
        amqp_url=servers.amqp,
        activation_secret="test-secret",
        activation_ttl_seconds=3600,
        max_body_bytes=16 * 1024,
        # Limits of their own tests (test_api.py, test_imports.py), not in everyone's way.
        activation_resend_seconds=0,
        imports_queued_per_key=100,
    )


@pytest.fixture
def client(config, memory_store):
    """A test client of the API over the in-memory store."""
    return create_app(config, store=memory_store).test_client()
