"""What one event costs the database does not grow with the backlog of pending e-mails: its plan
reads the rows of one person, not the whole backlog.

A bulk import once made the notifier quadratic: each applied event's cancellation step read
every pending delivery, through deliveries_due (an index of the pending ones only), in a plan
chosen while the statistics said few were pending and kept since. The plan is read as the
consumer meets it: prepared and generic, the statistics taken before the backlog.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import notifier
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

pytestmark = pytest.mark.integration

BACKLOG = 400  # welcomes sent, then as many pending, each of its own person
WITHIN = 20  # rows of deliveries any step of the plan may read: one person's


class Explaining:
    """A cursor for the store's apply_person that runs its statement as EXPLAIN ANALYZE instead
    (in a transaction rolled back afterwards) and keeps the plans."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn, self.plans = conn, []

    def execute(self, statement: str, params: Any = None) -> None:
        with self.conn.cursor() as cur:
            cur.execute(
                sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + sql.SQL(statement),
                params,
                prepare=True,
            )
            self.plans.append(cur.fetchone()[0][0]["Plan"])


def nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


def deliveries_read(plan: dict) -> int:
    """The most rows of deliveries any one step of the plan read (index entries or heap rows,
    those its filter removed included), over all its loops."""
    return max(
        (
            (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0))
            * node.get("Actual Loops", 1)
            for node in nodes(plan)
            if node.get("Relation Name") == "deliveries"
            or str(node.get("Index Name", "")).startswith(("deliveries", "one_"))
        ),
        default=0,
    )


def scans(plans: list[dict]) -> list[tuple]:
    """What each plan scans of deliveries, and with which index: for the failure's message."""
    return [
        (node["Node Type"], node.get("Index Name"), node.get("Rows Removed by Filter"))
        for plan in plans
        for node in nodes(plan)
        if node.get("Relation Name") == "deliveries" and "Scan" in node["Node Type"]
    ]


@pytest.fixture
def backlog(person_event, view, notifier_db) -> None:
    """BACKLOG e-mails sent and the statistics taken (few pending, as after a quiet hour), then
    as many pending that the statistics do not know of yet (a bulk import under way)."""
    for n in range(2 * BACKLOG):
        view(person_event(f"9{n:04d}", 1, "created", email=f"b{n}@example.com"))
        if n == BACKLOG - 1:
            with psycopg.connect(notifier_db, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO deliveries (kind, cpf, to_email, subject, html, text, event_id) "
                    "SELECT 'welcome', 'x' || n, 'x' || n || '@example.com', 's', 'h', 't', "
                    "gen_random_uuid() FROM generate_series(1, 20000) AS n"
                )
                conn.execute("UPDATE deliveries SET status = 'sent'")
                conn.execute("ANALYZE deliveries")


@pytest.fixture
def generic(notifier_db) -> Iterator[psycopg.Connection]:
    """A connection whose prepared statements are planned once for any parameters, as psycopg's
    are after their fifth run (the plan a long-lived consumer keeps)."""
    with psycopg.connect(notifier_db) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        yield conn
        conn.rollback()


def test_an_applied_event_reads_its_persons_deliveries_not_the_backlog(
    backlog, store, generic, person_event, view
):
    cursor = Explaining(generic)
    for version, change, email in ((2, "updated", "new@example.com"), (3, "deleted", None)):
        change = view.handlers.translate(person_event("90007", version, change, email=email))
        store.apply_person(cursor, change.event_id, change.cpf, change.version, change.state)
    assert len(cursor.plans) == 2
    read = [deliveries_read(plan) for plan in cursor.plans]
    assert max(read) <= WITHIN, (read, scans(cursor.plans))


ADDRESSES = [
    "victim@gmail.com",
    "Victim+1@GMAIL.com",
    "v.i.c.t.i.m@googlemail.com",
    "  v.i.c.t.i.m+x+y@gmail.com.  ",
    "ana.maria@corp.example",
    "Ana.Maria+news@Corp.Example.",
    "no-at-sign",
    "",
    "@",
    "a@b@c.example",
    "+tag@example.com",
    "a.b+c@googlemail.com",
    "ÀNA@exemplo.com.br",
    "dots...@gmail.com",
    "x@",
    None,
]


def compared(conn: psycopg.Connection, addresses: list[str | None]) -> list[tuple]:
    """Each address with the mailbox migration 014's function and migration 010's give it."""
    return conn.execute(
        "SELECT a, mailbox_of(a), pg_temp.mailbox_of_010(a) FROM unnest(%s::text[]) AS a",
        (addresses,),
    ).fetchall()


# Addresses built as the rule reads them: a local part and a domain from the characters it
# treats apart (case, dots, `+`, `@`, spaces) and any other (no NUL: not in a text), around an
# `@` or not, padded with blanks or not.
_PART = st.text(
    st.sampled_from("aZ.+@ _-ç") | st.characters(blacklist_categories=("Cs",), min_codepoint=1),
    max_size=12,
)
_DOMAIN = _PART | st.sampled_from(["gmail.com", "GoogleMail.com.", "GMAIL.COM..", "corp.example"])
_BLANK = st.sampled_from(["", " ", "\t", "\n", "  "])
ADDRESS_TEXT = st.builds(
    lambda before, local, at, domain, after: f"{before}{local}{at}{domain}{after}",
    _BLANK,
    _PART,
    st.sampled_from(["@", "", "@@"]),
    _DOMAIN,
    _BLANK,
)


def test_mailbox_of_gives_what_migration_010s_sql_function_gave(notifier_db):
    """Migration 014 replaced the function's body (PL/pgSQL for SQL) without rebuilding the
    index deliveries_by_mailbox: it must give the same mailbox for every address, the tricky
    ones chosen by hand and generated ones."""
    migration = Path(notifier.__file__).parent / "migrations" / "010_mailbox_cap.sql"
    before = migration.read_text().split("CREATE FUNCTION mailbox_of", 1)[1].split("$$;", 1)[0]
    with psycopg.connect(notifier_db, autocommit=True) as conn:
        conn.execute(f"CREATE FUNCTION pg_temp.mailbox_of_010{before}$$;")
        pairs = compared(conn, ADDRESSES)
        assert [(a, new) for a, new, _old in pairs] == [(a, old) for a, _new, old in pairs]
        assert {new for _a, new, _old in pairs} >= {"victim@gmail.com", "ana.maria@corp.example"}

        @settings(max_examples=60, deadline=None)
        @given(st.lists(ADDRESS_TEXT, min_size=1, max_size=20))
        def same_for(addresses: list[str]) -> None:
            for address, new, old in compared(conn, addresses):
                assert new == old, address

        same_for()
