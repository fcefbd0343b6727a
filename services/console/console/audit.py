"""The console's audit log, in its own database: every action, by whom, on how many messages.

An action is recorded before it runs and again with its outcome (`acting`); a view of personal
data, a sign-in and a sign-out are one row each (`record`). Failed sign-ins are rows too, and
the throttle counts them (`sign_in_wait`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

SIGN_IN_FAILED = "sign in failed"  # the partial index audit_sign_in_failures names it too


@dataclass
class Outcome:
    """What an action did, filled in by the caller while it runs."""

    count: int = 0
    detail: str = ""
    failed: bool = False


class AuditLog:
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def record(
        self,
        who: str,
        action: str,
        target: str,
        count: int,
        detail: str = "",
        phase: str = "done",
        intent: int | None = None,
    ) -> int:
        with self.pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO audit (who, action, target, count, detail, phase, intent) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (who, action, target, count, detail[:2000], phase, intent),
            ).fetchone()
        return row[0]

    @contextmanager
    def acting(
        self, who: str, action: str, target: str, count: int, detail: str = ""
    ) -> Iterator[Outcome]:
        """Record the intent (the action does not run if that fails), run the block, then
        record what it did; an exception is recorded as the outcome and raised again."""
        intent = self.record(who, action, target, count, detail, phase="intent")
        outcome = Outcome()
        try:
            yield outcome
        except Exception as exc:
            self.record(who, action, target, 0, f"{type(exc).__name__}: {exc}", "failed", intent)
            raise
        phase = "failed" if outcome.failed else "done"
        self.record(who, action, target, outcome.count, outcome.detail, phase, intent)

    def sign_in_wait(self, who: str, most: int, window: timedelta) -> int:
        """Seconds until `who` may try to sign in again: 0 while fewer than `most` of their
        sign-ins failed within `window`, else until the most-th latest of them is that old."""
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT ceil(extract(epoch FROM at + %s - now()))::int FROM audit "
                "WHERE action = 'sign in failed' AND who = %s AND at > now() - %s "
                "ORDER BY at DESC OFFSET %s LIMIT 1",
                (window, who, window, most - 1),
            ).fetchone()
        return max(1, row[0]) if row else 0

    def recent(self, limit: int = 200) -> list[dict]:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT id, at, who, action, target, count, detail, phase, intent FROM audit "
                "ORDER BY id DESC LIMIT %s",
                (limit,),
            )
            return cur.fetchall()

    def ping(self) -> None:
        with self.pool.connection() as conn:
            conn.execute("SELECT 1")
