"""PostgreSQL and Redis over Unix sockets where they run on the same machine
(docs/configuration.md): the database URL check accepts them, `make up` starts no container for
them (test_check_servers.py: it probes them), and the stores work over them."""

from __future__ import annotations

from datetime import date

import pytest
from local_sockets import SOCKET_DIR, socket_url
from person.migrate import migrate_database
from person.store import PgStore
from servicekit.database import check_url, connection_pool
from stack import servers as stack_servers


@pytest.mark.unit
@pytest.mark.parametrize(
    "url",
    [
        "postgresql:///person?host=/var/run/postgresql",
        "postgresql://%2Fvar%2Frun%2Fpostgresql/person",
        "host=/var/run/postgresql dbname=person user=person",
    ],
)
def test_the_database_url_check_takes_a_socket_for_one_server(url):
    assert check_url("PERSON_DATABASE_URL", url) == url


@pytest.mark.unit
def test_make_up_starts_no_container_for_a_socket():
    found, others = stack_servers.endpoints(
        [
            "PERSON_DATABASE_URL=postgresql:///person?host=/var/run/postgresql",
            "NOTIFIER_DATABASE_URL=postgresql://localhost/notifier?host=/var/run/postgresql",
            "CONSOLE_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/console",
            "SCORE_REDIS_URL=unix:///run/redis/redis.sock?db=0",
        ]
    )
    assert [e.variables for e in found] == [["CONSOLE_DATABASE_URL"]]
    assert others == ["PERSON_DATABASE_URL", "NOTIFIER_DATABASE_URL", "SCORE_REDIS_URL"]


@pytest.mark.integration
def test_a_registration_over_the_database_socket(make_database, service_url):
    admin = make_database("person")
    migrate_database(socket_url(admin))  # creating the database goes through `postgres`
    url = socket_url(service_url(admin, "person"))
    pool = connection_pool(check_url("PERSON_DATABASE_URL", url), "socket-test", max_size=2)
    try:
        store = PgStore(pool)
        created = store.create_person(
            {
                "cpf": "12345678901",
                "name": "Ana",
                "address": "Rua da Aurora, 1, Recife",
                "date_of_birth": date(1990, 1, 1),
                "email": "ana@example.com",
            },
            None,
        )
        assert store.get_person("12345678901") == created
        with pool.connection() as conn:
            assert conn.info.host == SOCKET_DIR  # not TCP
            [(events,)] = conn.execute("SELECT count(*) FROM messaging_outbox").fetchall()
        assert events == 1
    finally:
        pool.close()
