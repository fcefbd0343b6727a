"""Integration: each service's database role (servicekit.roles) uses its own tables and nothing
else, on the real PostgreSQL. The roles are this test run's own, dropped afterwards.

With TEST_DB_ROLES=yes the services' own test folders run as these roles too
(`TEST_DB_ROLES=yes make test`; docs/security.md).
"""

from __future__ import annotations

import psycopg
import pytest
from console.migrate import migrate_database as migrate_console
from messaging import Outbox, Relay, RelaySettings, outbox
from messaging.connection import connect
from messaging.testing import running, wait_until
from notifier.migrate import migrate_database as migrate_notifier
from person.migrate import migrate_database as migrate_person
from servicekit import migrate, roles

pytestmark = pytest.mark.integration


@pytest.fixture
def databases(make_database, db_role) -> dict[str, tuple[str, str]]:
    """Each service's migrated database: (the administrator's URL, the service role's URL)."""
    made = {}
    for service, migrate_database in (
        ("person", migrate_person),
        ("notifier", migrate_notifier),
        ("console", migrate_console),
    ):
        admin = make_database(service)
        migrate_database(admin)
        grants = {"append_only": ("audit",)} if service == "console" else {}
        made[service] = (admin, db_role(admin, service, **grants))
    return made


def _other_database(url: str, database: str) -> str:
    return f"{url.rpartition('/')[0]}/{database}"


def test_a_services_role_cannot_connect_to_another_services_database(databases):
    person_admin, _ = databases["person"]
    person_db = person_admin.rpartition("/")[2]
    for service in ("notifier", "console"):
        _, mine = databases[service]
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(_other_database(mine, person_db), connect_timeout=5).close()


def test_the_notifiers_role_cannot_read_the_person_tables_even_if_let_in(databases):
    """Should CONNECT be given back to everyone, the tables still are not the notifier's."""
    person_admin, _ = databases["person"]
    _, notifier = databases["notifier"]
    with psycopg.connect(person_admin, autocommit=True) as admin:
        database = person_admin.rpartition("/")[2]
        admin.execute(f'GRANT CONNECT ON DATABASE "{database}" TO PUBLIC')
    with psycopg.connect(_other_database(notifier, database), autocommit=True) as conn:
        for table in ("person", "item", "messaging_outbox"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT * FROM {table}")


@pytest.mark.parametrize("service", ["person", "notifier", "console"])
def test_a_services_role_takes_no_ddl(databases, service):
    _, mine = databases[service]
    with psycopg.connect(mine, autocommit=True) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ]
        for statement in (
            "CREATE TABLE forged (id int)",
            f"DROP TABLE {tables[0]}",
            f"TRUNCATE {tables[-1]}",
            "DELETE FROM schema_migrations",
            "CREATE FUNCTION forged() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        assert conn.execute(
            "SELECT rolsuper OR rolcreatedb OR rolcreaterole FROM pg_roles "
            "WHERE rolname = current_user"
        ).fetchone() == (False,)


def test_the_person_role_writes_its_tables_and_the_relay_publishes_with_it(databases, broker):
    _, person = databases["person"]
    conn = connect(broker.amqp_url, "test-declare")
    try:
        broker.topology("score").declare(conn)  # a queue to route the event to
    finally:
        conn.close()
    with psycopg.connect(person) as conn, conn.transaction(), conn.cursor() as cur:
        Outbox("person").add(cur, event_type="person.created", entity_id="p1", data={})
    relay = Relay(
        RelaySettings(
            database_url=person,
            amqp_url=broker.amqp_url,
            exchange=broker.exchange,
            poll_interval=0.5,
        )
    )
    with running(relay), psycopg.connect(person, autocommit=True) as conn:
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM messaging_outbox WHERE published_at IS NULL"
                ).fetchone()
                == (0,)
            ),
            what="the relay published with the person role",
        )


def test_a_services_start_finds_its_schema_current_without_ddl(databases):
    """The console migrates at its start: with its role, that is a read of schema_migrations."""
    _, console = databases["console"]
    assert migrate_console(console) == []
    with psycopg.connect(console) as conn:
        assert migrate.apply(conn, "console") == []


def test_grant_refuses_the_administrators_own_role(servers, make_database):
    admin = make_database("person")
    user = psycopg.connect(admin).info.user
    with pytest.raises(ValueError, match="administrator"):
        roles.grant(admin, f"postgresql://{user}:x@127.0.0.1/{admin.rpartition('/')[2]}")


def test_the_console_reads_the_outbox_of_the_person_database_and_nothing_else(databases, db_role):
    """Its pages show the outbox's backlog and history: a read-only grant on `messaging_*`."""
    person_admin, _ = databases["person"]
    with psycopg.connect(person_admin) as conn, conn.transaction(), conn.cursor() as cur:
        Outbox("person").add(cur, event_type="person.created", entity_id="p1", data={"cpf": "1"})
    console = db_role(person_admin, "console", read_only="messaging_")
    with psycopg.connect(console, autocommit=True) as conn:
        assert outbox.backlog(conn)[0] == 1
        assert [row["entity_id"] for row in outbox.history(conn, entity_ids=["p1"])] == ["p1"]
        for statement in (
            "SELECT * FROM person",
            "DELETE FROM messaging_outbox",
            "UPDATE messaging_outbox SET parked_at = now()",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_the_console_adds_to_its_audit_log_and_changes_nothing_in_it(databases):
    """The log of operators' actions is append-only for the console's own role."""
    _, console = databases["console"]
    with psycopg.connect(console, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO audit (who, action, target, count) VALUES ('key 1', 'sign in', '', 1)"
        )
        assert conn.execute("SELECT count(*) FROM audit").fetchone() == (1,)
        for statement in ("UPDATE audit SET who = 'someone else'", "DELETE FROM audit"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        conn.execute("DELETE FROM sessions")  # sign-out ends a session: that it may
