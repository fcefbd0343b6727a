"""Versioned SQL migrations, applied once each and in order, safe to run concurrently."""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import resources

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

log = logging.getLogger("servicekit.migrate")

_LOCK = 0x6D736701  # advisory lock id: one migrator at a time per database


def ensure_database(url: str) -> None:
    """Create the database named in `url` if it does not exist yet."""
    params = conninfo_to_dict(url)
    name = params.get("dbname")
    if not name:
        raise ValueError("the database URL names no database")
    admin = make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        # Processes that start together (gunicorn's workers, compose's services) create it once:
        # two concurrent CREATE DATABASE of one name fail on pg_database's unique index instead
        # of with DuplicateDatabase. The lock is the session's, released with the connection.
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK,))
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            log.info("created database %s", name)


def apply(
    conn: psycopg.Connection,
    package: str,
    extra_steps: dict[str, Callable[[psycopg.Connection], None]] | None = None,
) -> list[str]:
    """Apply the package's `migrations/NNN_name.sql` files not applied yet; return their names.

    `extra_steps` maps a version name to a Python step (for DDL owned by a library, such as the
    outbox), applied in the same order as the files.
    """
    steps: dict[str, Callable[[psycopg.Connection], None]] = dict(extra_steps or {})
    folder = resources.files(package).joinpath("migrations")
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            steps[entry.name.removesuffix(".sql")] = _sql_step(entry.read_text())
    applied: list[str] = []
    if _up_to_date(conn, steps):  # a service's own role may not take DDL, nor need to
        return applied
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version in sorted(steps):
            if version in done:
                continue
            steps[version](conn)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            applied.append(version)
    for version in applied:
        log.info("applied migration %s", version)
    return applied


def _up_to_date(conn: psycopg.Connection, steps: dict) -> bool:
    """Every step applied already: read only (a service's role may SELECT schema_migrations,
    never create it; servicekit.roles)."""
    with conn.transaction():
        if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
            return False
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    return set(steps) <= done


def _sql_step(text: str) -> Callable[[psycopg.Connection], None]:
    def run(conn: psycopg.Connection) -> None:
        conn.execute(text)

    return run
