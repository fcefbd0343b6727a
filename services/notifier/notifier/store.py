"""All SQL of the notifier: the user view, the delivery ledger and the development mailbox."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from messaging.idempotency import upsert_if_newer_query
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

DELIVERY_COLUMNS = (
    "id, kind, cpf, to_email, subject, html, text, status, attempts, next_attempt_at, "
    "last_error, provider, provider_message_id, created_at, sent_at"
)


_INTENT_COLUMNS = "kind, cpf, registered_at, event_id, to_email, subject, html, text"
_USER_COLUMNS = (
    "cpf",
    "version",
    "deleted",
    "name",
    "email",
    "status",
    "registered_at",
    "updated_at",
)
_UPSERT_USER = upsert_if_newer_query("users", ("cpf",), _USER_COLUMNS)
# Applied (RETURNING a row) → the welcome, unless the unique index on (cpf, registered_at)
# says this registration has one already.
_UPSERT_USER_THEN_WELCOME = (
    f"WITH applied AS ({_UPSERT_USER} RETURNING cpf) "
    f"INSERT INTO deliveries ({_INTENT_COLUMNS}) "
    "SELECT 'welcome', cpf, %(registered_at)s, %(event_id)s, %(to_email)s, %(subject)s, "
    "%(html)s, %(text)s FROM applied ON CONFLICT DO NOTHING"
)


@dataclass(frozen=True)
class Intent:
    """An e-mail the consumer wants sent, composed from one event."""

    event_id: Any
    to_email: str
    subject: str
    html: str
    text: str


def _intent_params(intent: Intent) -> dict[str, Any]:
    return {
        "event_id": intent.event_id,
        "to_email": intent.to_email,
        "subject": intent.subject,
        "html": intent.html,
        "text": intent.text,
    }


class NotifierStore:
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    @contextlib.contextmanager
    def transaction(self, pipelined: bool = False) -> Iterator[psycopg.Cursor]:
        """One transaction on a pooled connection: commit on success, roll back on error.

        `pipelined`: BEGIN, the statements and COMMIT go out together (psycopg pipeline mode),
        so results are not for reading; an error surfaces at the latest on leaving.
        """
        with (
            self.pool.connection() as conn,
            conn.pipeline() if pipelined else contextlib.nullcontext(),
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            yield cur

    # -- consumer side (called inside the handler's transaction) -------------------------------
    # Each event becomes statements whose results nobody reads, so a batch of events can be
    # queued in one pipeline and cost one round trip: the conditions live in the SQL.
    @staticmethod
    def apply_person(
        cur: psycopg.Cursor,
        cpf: str,
        version: int,
        state: dict | None,
        welcome: Intent | None = None,
    ) -> None:
        """Version-gated upsert of the view (a deletion is kept as a tombstone); if the event
        was applied and `welcome` is given, record it unless this registration has one."""
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
        if welcome is None:
            cur.execute(_UPSERT_USER, row)
        else:
            cur.execute(_UPSERT_USER_THEN_WELCOME, {**row, **_intent_params(welcome)})

    @staticmethod
    def record_activation(cur: psycopg.Cursor, cpf: str, intent: Intent) -> None:
        """Record an activation e-mail (once per event) if the person is in the view, alive."""
        cur.execute(
            f"INSERT INTO deliveries ({_INTENT_COLUMNS}) "
            "SELECT 'activation', cpf, NULL, %(event_id)s, %(to_email)s, %(subject)s, %(html)s, "
            "%(text)s FROM users WHERE cpf = %(cpf)s AND NOT deleted ON CONFLICT DO NOTHING",
            {**_intent_params(intent), "cpf": cpf},
        )

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
