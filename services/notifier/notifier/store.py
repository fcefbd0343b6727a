"""All SQL of the notifier: the user view, the delivery ledger and the development mailbox."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
from messaging.idempotency import upsert_if_newer
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

DELIVERY_COLUMNS = (
    "id, kind, cpf, to_email, subject, html, text, status, attempts, next_attempt_at, "
    "last_error, provider, provider_message_id, created_at, sent_at"
)


class NotifierStore:
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor]:
        """One transaction on a pooled connection: commit on success, roll back on error."""
        with (
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            yield cur

    # -- consumer side (called inside the handler's transaction) -------------------------------
    @staticmethod
    def apply_person(cur: psycopg.Cursor, cpf: str, version: int, state: dict | None) -> bool:
        """Version-gated upsert of the view; a deletion is kept as a tombstone."""
        row = {
            "cpf": cpf,
            "version": version,
            "deleted": state is None,
            "name": None,
            "email": None,
            "status": None,
            "registered_at": None,
        }
        if state is not None:
            row.update(
                name=state.get("name"),
                email=state.get("email"),
                status=state.get("status"),
                registered_at=state.get("created_at"),
            )
        row["updated_at"] = datetime.now().astimezone()
        return upsert_if_newer(cur, "users", ["cpf"], row)

    @staticmethod
    def current_user(cur: psycopg.Cursor, cpf: str) -> dict | None:
        cur.execute("SELECT * FROM users WHERE cpf = %s", (cpf,))
        return cur.fetchone()

    @staticmethod
    def record_intent(
        cur: psycopg.Cursor,
        *,
        kind: str,
        cpf: str,
        registered_at: Any,
        event_id: Any,
        to_email: str,
        subject: str,
        html: str,
        text: str,
    ) -> bool:
        """Add a pending delivery; False if this registration or event already has one."""
        cur.execute(
            "INSERT INTO deliveries (kind, cpf, registered_at, event_id, to_email, subject, "
            "html, text) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (
                kind,
                cpf,
                registered_at if kind == "welcome" else None,
                event_id,
                to_email,
                subject,
                html,
                text,
            ),
        )
        return cur.rowcount == 1

    @staticmethod
    def has_welcome(cur: psycopg.Cursor, cpf: str, registered_at: Any) -> bool:
        cur.execute(
            "SELECT 1 FROM deliveries WHERE kind = 'welcome' AND cpf = %s AND registered_at = %s",
            (cpf, registered_at),
        )
        return cur.fetchone() is not None

    # -- sender side ---------------------------------------------------------------------------
    def claim_due(self, limit: int, lease_seconds: float) -> list[dict]:
        """Claim deliveries that are due, committing the claim before anything is sent.

        A claim older than the lease belongs to a sender that died: it is claimed again.
        """
        with self.transaction() as cur:
            cur.execute(
                f"""
                UPDATE deliveries SET status = 'sending', claimed_at = now(),
                                      attempts = attempts + 1
                WHERE id IN (
                    SELECT id FROM deliveries
                    WHERE (status = 'pending' AND next_attempt_at <= now())
                       OR (status = 'sending' AND claimed_at < now() - %s * interval '1 second')
                    ORDER BY id FOR UPDATE SKIP LOCKED LIMIT %s)
                RETURNING {DELIVERY_COLUMNS}
                """,
                (lease_seconds, limit),
            )
            return sorted(cur.fetchall(), key=lambda d: d["id"])

    def mark_sent(self, delivery_id: int, provider: str, message_id: str | None) -> None:
        with self.transaction() as cur:
            cur.execute(
                "UPDATE deliveries SET status = 'sent', sent_at = now(), provider = %s, "
                "provider_message_id = %s, last_error = NULL WHERE id = %s",
                (provider, message_id, delivery_id),
            )

    def mark_retry(
        self, delivery_id: int, after_seconds: float, error: str, counts: bool = True
    ) -> None:
        """Back to pending after a delay; `counts=False` gives the claim's attempt back."""
        with self.transaction() as cur:
            cur.execute(
                "UPDATE deliveries SET status = 'pending', last_error = %s, "
                "attempts = attempts - %s, "
                "next_attempt_at = now() + %s * interval '1 second' WHERE id = %s",
                (error, 0 if counts else 1, after_seconds, delivery_id),
            )

    def mark_failed(self, delivery_id: int, error: str) -> None:
        with self.transaction() as cur:
            cur.execute(
                "UPDATE deliveries SET status = 'failed', last_error = %s WHERE id = %s",
                (error, delivery_id),
            )

    def deliver_to_mailbox(self, delivery: dict, from_email: str) -> None:
        """The development transport: the e-mail lands in the mailbox table, marked sent."""
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO mailbox (delivery_id, to_email, from_email, subject, html, text) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (delivery_id) DO NOTHING",
                (
                    delivery["id"],
                    delivery["to_email"],
                    from_email,
                    delivery["subject"],
                    delivery["html"],
                    delivery["text"],
                ),
            )
            cur.execute(
                "UPDATE deliveries SET status = 'sent', sent_at = now(), provider = 'mailbox', "
                "last_error = NULL WHERE id = %s",
                (delivery["id"],),
            )

    def next_due_in(self) -> float | None:
        """Seconds until the earliest pending delivery is due (None if there is none)."""
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM min(next_attempt_at) - now()) FROM deliveries "
                "WHERE status = 'pending'"
            ).fetchone()
        return None if row[0] is None else max(0.0, float(row[0]))

    # -- API side ------------------------------------------------------------------------------
    def user(self, cpf: str) -> dict | None:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT cpf, name, email, status, registered_at, version FROM users "
                "WHERE cpf = %s AND NOT deleted",
                (cpf,),
            )
            user = cur.fetchone()
            if user is None:
                return None
            cur.execute(
                "SELECT id, status, attempts, last_error, sent_at, created_at FROM deliveries "
                "WHERE kind = 'welcome' AND cpf = %s AND registered_at IS NOT DISTINCT FROM %s",
                (cpf, user["registered_at"]),
            )
            user["welcome"] = cur.fetchone()
            return user

    def mailbox(self, limit: int) -> list[dict]:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT id, delivery_id, to_email, from_email, subject, html, text, "
                "received_at FROM mailbox ORDER BY id DESC LIMIT %s",
                (limit,),
            )
            return cur.fetchall()

    def mail(self, mail_id: int) -> dict | None:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT id, to_email, subject, html FROM mailbox WHERE id = %s", (mail_id,))
            return cur.fetchone()

    def deliveries(self, status: str | None, limit: int) -> list[dict]:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT id, kind, cpf, to_email, subject, status, attempts, next_attempt_at, "
                "last_error, provider, provider_message_id, created_at, sent_at FROM deliveries "
                "WHERE %(status)s::text IS NULL OR status = %(status)s ORDER BY id DESC "
                "LIMIT %(limit)s",
                {"status": status, "limit": limit},
            )
            return cur.fetchall()

    def retry(self, delivery_id: int) -> str | None:
        """Queue a failed delivery again; its previous status, or None if it does not exist."""
        with self.transaction() as cur:
            cur.execute("SELECT status FROM deliveries WHERE id = %s FOR UPDATE", (delivery_id,))
            row = cur.fetchone()
            if row is None:
                return None
            if row["status"] == "failed":
                cur.execute(
                    "UPDATE deliveries SET status = 'pending', attempts = 0, "
                    "next_attempt_at = now() WHERE id = %s",
                    (delivery_id,),
                )
            return row["status"]

    def beat(self, name: str, stats: dict | None = None) -> None:
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO heartbeats (name, seen_at, stats) VALUES (%s, now(), %s) "
                "ON CONFLICT (name) DO UPDATE SET seen_at = now(), stats = EXCLUDED.stats",
                (name, Jsonb(stats) if stats is not None else None),
            )

    def stats(self, name: str) -> dict | None:
        """What the named process last reported with its heartbeat."""
        with self.pool.connection() as conn:
            row = conn.execute("SELECT stats FROM heartbeats WHERE name = %s", (name,)).fetchone()
        return row[0] if row else None

    def delivery_counts(self) -> dict[str, int]:
        """E-mail deliveries by status (pending, sending, sent, failed)."""
        with self.pool.connection() as conn:
            return dict(
                conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status").fetchall()
            )

    def alive(self, name: str, within_seconds: float) -> bool:
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT seen_at > now() - %s * interval '1 second' FROM heartbeats WHERE name = %s",
                (within_seconds, name),
            ).fetchone()
        return bool(row and row[0])

    def ping(self) -> None:
        with self.pool.connection() as conn:
            conn.execute("SELECT 1")
