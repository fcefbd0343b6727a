"""Fixtures of the notifier's tests: a migrated database, its store, a fake SendGrid."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from messaging.testing import InMemoryBus
from notifier.config import NotifierConfig
from notifier.consumer import SERVICE, UserView, build
from notifier.email import Composed, composer_for
from notifier.migrate import migrate_database
from notifier.store import DELIVERY_COLUMNS, NotifierStore
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool


@pytest.fixture
def notifier_db(make_database, service_url) -> str:
    url = make_database("notifier")
    migrate_database(url)
    return service_url(url, "notifier")


@pytest.fixture
def config(notifier_db, servers, fake_sendgrid) -> NotifierConfig:
    return NotifierConfig(
        notifier_database_url=notifier_db,
        amqp_url=servers.amqp,
        sendgrid_api_key="SG.test-key-not-a-secret",
        sendgrid_host=fake_sendgrid.url,
        sendgrid_timeout_seconds=0.5,
        activation_secret="test-secret",
        public_person_url="http://person.test",
        sender_poll_seconds=0.2,
    )


@pytest.fixture
def store(notifier_db) -> Iterator[NotifierStore]:
    with ConnectionPool(notifier_db, min_size=1, max_size=8) as pool:
        yield NotifierStore(pool)


@pytest.fixture
def view(store, config) -> UserView:
    return UserView(store)


@pytest.fixture
def composed(store, config) -> Callable[[str], dict[str, Composed]]:
    """cpf -> the person's recorded deliveries by kind, each composed as the sender composes it
    (a delivery records the intent alone: the text and the link are made as it goes out)."""
    composer = composer_for(config)

    def by_kind(cpf: str) -> dict[str, Composed]:
        with store.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE cpf = %s ORDER BY id", (cpf,)
            )
            rows = cur.fetchall()
        assert all(row["html"] is None and row["text"] is None for row in rows), "text stored"
        return {row["kind"]: composer.for_delivery(row) for row in rows}

    return by_kind


@pytest.fixture
def bus(config, store) -> InMemoryBus:
    """The in-memory broker in front of the consumer the process builds, on this test's
    database: the consumer's own handlers, validation and batching decide."""
    bus = InMemoryBus()
    bus.attach(build(config, store.pool)[0])
    return bus


@pytest.fixture
def queue(config) -> str:
    return config.topology(SERVICE).queue
