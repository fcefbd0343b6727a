"""A service's own database role: python -m servicekit.roles SERVICE_URL [--admin-url ADMIN_URL].

The migrations run as the database's owner or an administrator (ADMIN_URL: compose's superuser,
CloudNativePG's owner); the service runs as the role SERVICE_URL names, which this makes (or
updates: its password) with only what a service does with its own database:

- LOGIN and nothing else (no superuser, no CREATEDB, no CREATEROLE, no inherited role);
- CONNECT on its database, which no other role gets through PUBLIC any more (another service's
  role cannot even connect to it);
- USAGE on the schema `public`, never CREATE: no table, function or trigger of its own;
- SELECT, INSERT, UPDATE, DELETE on every table there (an outbox row is written in the same
  transaction as the person's; a store's `LOCK TABLE ... IN SHARE MODE` needs UPDATE), but only
  SELECT on `schema_migrations` (a service checks the schema is current, only the migrate step
  changes it), and no TRUNCATE, REFERENCES or TRIGGER;
- USAGE and SELECT on every sequence (ids of `bigserial` columns).

Advisory locks, LISTEN, NOTIFY and the migrations' functions (`pg_notify` from a trigger, the
notifier's `mailbox_of`) need no grant: PostgreSQL lets every role use them. Run it after the
migrations, each time: tables a later migration adds get their grants then.
"""

from __future__ import annotations

import argparse
import os
import sys

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .settings import refuse_placeholder

_LOCK = 0x6D736702  # one role change at a time per server (CREATE ROLE races on pg_authid)
READ_ONLY_TABLES = ("schema_migrations",)


def grant(
    admin_url: str,
    service_url: str,
    read_only: str | None = None,
    append_only: tuple[str, ...] = (),
) -> str:
    """Make SERVICE_URL's role able to use its database's tables and nothing else; its name.

    `read_only`: a prefix of table names: the role may only read those tables of this database
    (the console reads the producer's outbox, `messaging_`, and nothing else of the person
    database). `append_only`: tables the role may add rows to and read, never change or delete
    (the console's audit log)."""
    params = conninfo_to_dict(service_url)
    role, password, database = params.get("user"), params.get("password"), params.get("dbname")
    if not role or not database:
        raise ValueError("the service's database URL must name a user and a database")
    if password:
        refuse_placeholder("the password of the service's database URL", password)
    admin = make_conninfo(admin_url, dbname=database)
    with psycopg.connect(admin) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        if conn.execute("SELECT current_user = %s", (role,)).fetchone()[0]:
            raise ValueError(f"the service's role {role} is the administrator's: name another")
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        attributes = sql.SQL(
            "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS"
        )
        if password:
            attributes = sql.SQL("{} PASSWORD {}").format(attributes, sql.Literal(password))
        verb = sql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
        conn.execute(sql.SQL("{} {} {}").format(verb, sql.Identifier(role), attributes))
        name, db = sql.Identifier(role), sql.Identifier(database)
        for statement in (
            "REVOKE ALL ON DATABASE {db} FROM PUBLIC",
            "GRANT CONNECT ON DATABASE {db} TO {name}",
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
            "GRANT USAGE ON SCHEMA public TO {name}",
        ):
            conn.execute(sql.SQL(statement).format(db=db, name=name))
        if read_only is not None:
            tables = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND starts_with(tablename, %s)",
                (read_only,),
            ).fetchall()
            for (table,) in tables:
                conn.execute(
                    sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(table), name)
                )
            return role
        for statement in (
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {name}",
            "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {name}",
        ):
            conn.execute(sql.SQL(statement).format(db=db, name=name))
        for table in append_only:
            conn.execute(
                sql.SQL("REVOKE UPDATE, DELETE ON {} FROM {}").format(sql.Identifier(table), name)
            )
        for table in READ_ONLY_TABLES:
            if conn.execute("SELECT to_regclass(%s)", (f"public.{table}",)).fetchone()[0]:
                conn.execute(
                    sql.SQL("REVOKE INSERT, UPDATE, DELETE ON {} FROM {}").format(
                        sql.Identifier(table), name
                    )
                )
    return role


def drop(admin_url: str, role: str, databases: list[str]) -> None:
    """Remove a role this module made: its grants in each database, then the role (tests)."""
    for database in databases:
        with psycopg.connect(make_conninfo(admin_url, dbname=database), autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = off")  # a test made it read-only
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(
                sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(
                    sql.Identifier(database), sql.Identifier(role)
                )
            )
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(prog="python -m servicekit.roles", description=__doc__)
    args.add_argument("service_url", help="the service's database URL: its role, password, db")
    args.add_argument("--admin-url", help="an owner's or administrator's URL (else ADMIN_URL)")
    args.add_argument(
        "--read-only",
        metavar="PREFIX",
        help="only read the tables whose names start with PREFIX (the console: messaging_)",
    )
    args.add_argument(
        "--append-only",
        metavar="TABLE,...",
        default="",
        help="tables the role may only add rows to and read (the console: audit)",
    )
    parsed = args.parse_args(argv)
    admin = parsed.admin_url or os.environ.get("ADMIN_URL")
    if not admin:
        print("roles: give --admin-url or ADMIN_URL", file=sys.stderr)
        return 2
    try:
        appended = tuple(name for name in parsed.append_only.split(",") if name)
        role = grant(admin, parsed.service_url, parsed.read_only, appended)
    except ValueError as exc:
        print(f"roles: {exc}", file=sys.stderr)
        return 2
    database = conninfo_to_dict(parsed.service_url)["dbname"]
    what = f"reads {parsed.read_only}* of" if parsed.read_only else "its tables in"
    print(f"database role {role}: {what} {database} (no DDL)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
