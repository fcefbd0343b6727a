"""PostgreSQL and Redis over Unix sockets where they run on the same machine
(docs/configuration.md): every URL check accepts them, `make up` probes them and starts no
container for them, and the stores work over them."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
from own_servers import own_redis_socket
from person.migrate import migrate_database
from person.store import PgStore
from psycopg.conninfo import conninfo_to_dict
from servicekit.database import check_url, connection_pool
from stack import servers as stack_servers

SOCKET_DIR = "/var/run/postgresql"  # Debian's; the system server's socket


def check(**urls: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stack.check_servers", *(f"{k}={v}" for k, v in urls.items())],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def socket_url(tcp_url: str) -> str:
    """The same database, user and port through the server's socket; skip where the test
    server has none here (a container)."""
    port = conninfo_to_dict(tcp_url).get("port", "5432")
    if not Path(SOCKET_DIR, f".s.PGSQL.{port}").exists():
        pytest.skip(f"no PostgreSQL socket for port {port} in {SOCKET_DIR}")
    params = {k: v for k, v in conninfo_to_dict(tcp_url).items() if k not in ("host", "hostaddr")}
    return f"postgresql:///{params.pop('dbname')}?host={SOCKET_DIR}&" + "&".join(
        f"{k}={v}" for k, v in params.items()
    )


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
def test_make_up_probes_servers_at_their_sockets(servers, tmp_path):
    database = socket_url(servers.database)
    with own_redis_socket() as redis_url:
        result = check(PERSON_DATABASE_URL=database, SCORE_REDIS_URL=redis_url)
        assert result.returncode == 0, result.stdout
        assert result.stdout.count("✓") == 2
    missing = f"unix://{tmp_path}/redis.sock?db=0"
    result = check(SCORE_REDIS_URL=missing)
    assert result.returncode == 1
    assert f"✗ SCORE_REDIS_URL={missing} did not answer (ConnectionError)." in result.stdout
    assert "--unixsocket" in result.stdout


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
