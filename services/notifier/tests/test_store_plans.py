"""What one event costs the database does not grow with the backlog of pending e-mails: its plan
reads the rows of one person, not the whole backlog.

A bulk import once made the notifier quadratic: each applied event's cancellation step read
every pending delivery (its cached, generic plan intersected the person's rows with the whole of
deliveries_due). The plan is read as the consumer meets it: prepared and generic.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

pytestmark = pytest.mark.integration

BACKLOG = 400  # pending welcomes, each of its own person
WITHIN = 20  # rows of deliveries any step of a plan may read: one person's, or one batch's


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


@pytest.fixture
def backlog(person_event, view) -> None:
    for n in range(BACKLOG):
        view(person_event(f"9{n:04d}", 1, "created", email=f"b{n}@example.com"))


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
    assert max(deliveries_read(plan) for plan in cursor.plans) <= WITHIN, json.dumps(cursor.plans)
