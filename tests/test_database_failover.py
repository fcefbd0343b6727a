"""The pieces that follow the person and notifier databases to a promoted standby, on a primary
and synchronous standby of the module's own (stack/pg_pair.py): the URL check, the services'
connection pool, the relay's election."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from messaging import Relay, RelaySettings
from messaging.testing import running, wait_until
from person.migrate import migrate_database
from psycopg_pool import PoolTimeout
from relay_lock import relay_lock_holders
from servicekit.database import check_url, connection_pool
from stack.pg_pair import PgPair

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


@pytest.fixture
def pair(pg_pair: PgPair) -> Iterator[PgPair]:
    """The module's pair with a primary and a synchronous standby running, whatever the test
    before did to it."""
    pg_pair.heal()
    yield pg_pair


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:secret@db-a:5432,db-b:5432/person",
        "host=db-a,db-b port=5432,5432 dbname=person password=secret",
        "host=db-a,db-b dbname=person target_session_attrs=any password=secret",
    ],
)
def test_a_url_listing_servers_must_ask_for_the_one_that_takes_writes(url):
    with pytest.raises(ValueError) as refused:
        check_url("PERSON_DATABASE_URL", url)
    assert "PERSON_DATABASE_URL lists 2 servers: add target_session_attrs=read-write" in str(
        refused.value
    )
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app@db-a:5432,db-b:5433/person?target_session_attrs=read-write",
        "host=db-a,db-b port=5432,5433 dbname=person target_session_attrs=primary",
        "postgresql://postgres@127.0.0.1:5432/person",
    ],
)
def test_one_server_or_a_list_asking_for_the_writable_one_is_accepted(url):
    assert check_url("PERSON_DATABASE_URL", url) == url


def test_a_pool_loses_one_request_to_a_failover_and_finds_the_new_primary(pair):
    pool = connection_pool(pair.url("postgres"), "failover-test", max_size=4, min_size=4)
    with pool:
        pool.wait()  # four idle connections to the primary
        pair.failover()
        with pytest.raises(psycopg.OperationalError), pool.connection() as conn:
            conn.execute("SELECT 1")
        # The three idle connections to the dead primary go with the first one lost...
        wait_until(lambda: pool.get_stats().get("connections_lost", 0) >= 3, what="the sweep")
        # ...so none of them fails a request: each runs on the new primary.
        ports = set()
        for _ in range(8):
            with pool.connection() as conn:
                ports.add(conn.execute("SHOW port").fetchone()[0])
        assert ports == {str(pair.servers[pair.primary].port)}


def test_a_request_waits_at_most_the_pool_timeout_while_no_server_takes_writes(pair):
    pool = connection_pool(pair.url("postgres"), "failover-test", max_size=2, timeout=1)
    with pool:
        pool.wait()
        pair.kill_primary()  # and the standby is not promoted yet
        with pytest.raises((psycopg.OperationalError, PoolTimeout)), pool.connection() as conn:
            conn.execute("SELECT 1")
        with pytest.raises(PoolTimeout), pool.connection() as conn:
            conn.execute("SELECT 1")
        pair.promote()
        with pool.connection(timeout=10) as conn:
            assert conn.execute("SELECT NOT pg_is_in_recovery()").fetchone()[0]


def test_a_relay_never_leads_on_a_standby(pair, servers, caplog):
    name = f"relay_{uuid.uuid4().hex[:8]}"
    migrate_database(pair.url(name))
    standby = pair.servers[pair.standby].url(name)
    settings = RelaySettings(
        database_url=standby, amqp_url=servers.amqp, exchange=f"test-{name}", poll_interval=0.2
    )
    relay = Relay(settings)
    with caplog.at_level(logging.WARNING, logger="messaging.relay"), running(relay):
        wait_until(
            lambda: "the database is a standby" in caplog.text, what="the relay saw a standby"
        )
        assert not relay.is_leader.is_set()
        assert relay_lock_holders(standby) == []
