"""All SQL of the notifier: the user view, the delivery ledger and the development mailbox."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from messaging import digests as sums
from messaging.stores import postgres_errors, versioned_upsert
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from servicekit import tracing

log = logging.getLogger("notifier.store")

HEARTBEAT_FORGET_SECONDS = 3600  # a replica's heartbeat row is deleted this long after its last

# A delivery records an intent (kind, cpf, name, to_email, registered_at): the sender composes
# the e-mail as it sends it (email.Composer.for_delivery). html and text are set only on rows
# recorded before migration 015, which are sent as recorded.
DELIVERY_COLUMNS = (
    "id, kind, cpf, name, registered_at, to_email, subject, html, text, status, attempts, "
    "next_attempt_at, last_error, provider, provider_message_id, created_at, sent_at, "
    "claim_token, trace_context"
)


_INTENT_COLUMNS = "kind, cpf, registered_at, event_id, to_email, subject, name, trace_context"
_USER_COLUMNS = (
    "cpf",
    "version",
    "deleted",
    "name",
    "email",
    "status",
    "registered_at",
    "updated_at",
    "bucket",
    "contribution",
)
_UPSERT_USER = versioned_upsert("users", ("cpf",), _USER_COLUMNS)
# A delivery `d` is current while the view holds, at its version or later, the same registration
# of the person, not deleted, at the address it goes to: only a current delivery is claimed.
_CURRENT = """EXISTS (
    SELECT 1 FROM users u WHERE u.cpf = d.cpf AND NOT u.deleted
      AND u.version >= coalesce(d.version, 0)
      AND u.registered_at IS NOT DISTINCT FROM d.registered_at
      AND lower(u.email) = lower(d.to_email))"""
# ... and superseded once the view holds a later version without that registration or address:
# it is cancelled then, for good (an older event applied after a loss supersedes nothing).
_NO_LONGER_FOR = """(u.deleted OR u.registered_at IS DISTINCT FROM d.registered_at
      OR lower(u.email) IS DISTINCT FROM lower(d.to_email))"""
_SUPERSEDED = f"""EXISTS (
    SELECT 1 FROM users u WHERE u.cpf = d.cpf AND u.version > coalesce(d.version, 0)
      AND {_NO_LONGER_FOR})"""

# One statement per event, whose results nobody reads. Every e-mail decision happens only if the
# event was applied (the version-gated upsert RETURNING a row): a late, duplicated or replayed
# event mails no one. What it records is each e-mail's intent, composed when it is sent. An
# applied event cancels the person's pending e-mails recorded by an older event that it no
# longer calls for (a deletion, a new registration, another address: see
# _SUPERSEDED), and records each e-mail the consumer intends for it (email.KINDS decides which
# an event's type calls for), once per event and kind, and a kind that goes once per
# registration (the welcome) only if the registration has none (the unique indexes
# one_welcome_per_registration and one_per_registration); any kind but the welcome only once the
# registration has its welcome; to the address the event carries: the current one. Past the
# day's cap of e-mails to one mailbox (mailbox_of, migration 010: case, `+tags` and Gmail's
# dots aside), what it records is suppressed instead of pending, and says why.
# The cancellation reads the person's own deliveries (deliveries_by_person: a few), never an
# index of every pending one: the cpf is a parameter of its own, and the status test is written
# so that no partial index on pending deliveries matches it. The plan of a statement run often
# is kept (psycopg prepares it), and one chosen while few e-mails were pending would scan all of
# them per event once a bulk import had queued thousands (tests: test_store_plans.py).
_APPLY_PERSON = f"""
WITH u AS ({_UPSERT_USER} RETURNING cpf, version, deleted, registered_at, email),
cancelled AS (
    UPDATE deliveries d SET status = 'cancelled', last_error = 'cancelled: ' || %(why)s
    FROM u WHERE d.cpf = %(cpf)s AND d.cpf = u.cpf AND coalesce(d.status, '') = 'pending'
      AND coalesce(d.version, 0) < u.version AND {_NO_LONGER_FOR}
    RETURNING d.id
),
recent AS (
    SELECT count(*) AS sent FROM deliveries
    WHERE mailbox_of(to_email) = mailbox_of(%(to_email)s)
      AND created_at > now() - interval '1 day'
      AND status NOT IN ('suppressed', 'cancelled')
)
INSERT INTO deliveries ({_INTENT_COLUMNS}, once_per_registration, version, status, last_error)
SELECT kind, cpf, registered_at, %(event_id)s, %(to_email)s, subject, %(greet)s::text,
       %(trace_context)s, once, u.version,
       CASE WHEN recent.sent >= %(daily_cap)s THEN 'suppressed' ELSE 'pending' END,
       CASE WHEN recent.sent >= %(daily_cap)s
            THEN 'suppressed: ' || %(daily_cap)s || ' e-mails to the mailbox '
                 || mailbox_of(%(to_email)s) || ' in 24 h already '
                 || '(EMAILS_PER_ADDRESS_PER_DAY; case, +tags and Gmail dots aside)' END
FROM u, recent,
     unnest(%(kinds)s::text[], %(subjects)s::text[], %(once)s::boolean[])
       WITH ORDINALITY AS mail (kind, subject, once, n)
-- a registration's first e-mail is its welcome, which carries the link: any other kind only
-- once it has one (not a second e-mail from the same event, or for a first address)
WHERE (mail.kind = 'welcome' OR EXISTS (
      SELECT 1 FROM deliveries w WHERE w.kind = 'welcome' AND w.cpf = u.cpf
        AND w.registered_at IS NOT DISTINCT FROM u.registered_at))
ORDER BY mail.n
ON CONFLICT DO NOTHING
"""
# The first `limit` due deliveries in id order (pending and due, or claimed longer ago than the
# lease) that are either current (_CURRENT) or, still pending, superseded (_SUPERSEDED), locked
# with SKIP LOCKED so two senders never take the same one; the superseded ones are cancelled
# there and then, for good (one that failed and was retried meanwhile, or that was being sent
# when the change came). Only the batch is looked at, never the whole due backlog, and the
# partial index deliveries_open (migration 003) serves the id order. Each statement that takes
# due deliveries (_CLAIM, _TO_MAILBOX) starts with these two CTEs and uses `due.current`. The
# limit is written in the statement, not sent as a parameter: psycopg prepares a statement run
# often, and PostgreSQL's generic plan for an unknown limit sorts the whole open backlog.
_CANCELLED = "cancelled: the person was deleted, registered again or changed address"
_DUE_AND_CANCELLED = f"""
WITH due AS (
    SELECT d.id AS due_id, {_CURRENT} AS current FROM deliveries d
    WHERE ((d.status = 'pending' AND d.next_attempt_at <= now())
       OR (d.status = 'sending'
           AND d.claimed_at < now() - %(lease)s * interval '1 second'))
      AND d.id <> ALL(%(skip)s)
      AND ({_CURRENT} OR (d.status = 'pending' AND {_SUPERSEDED}))
    ORDER BY d.id FOR UPDATE SKIP LOCKED LIMIT {{limit}}
), cancelled AS (
    UPDATE deliveries d SET status = 'cancelled', last_error = '{_CANCELLED}'
    FROM due WHERE d.id = due.due_id AND NOT due.current
    RETURNING d.id, d.status
)"""

# The sender's claim, one statement: the current due deliveries become 'sending' under a new
# token, one attempt more, committed before anything is sent.
_CANCELLED_ROW = [  # a cancelled delivery's row in the claim's answer: its id and status alone
    c if c in ("id", "status") else "NULL" for c in (c.strip() for c in DELIVERY_COLUMNS.split(","))
]


def _returned(column: str) -> str:
    """A delivery's column as a statement taking due deliveries returns it: the registration's
    time as ISO 8601 text, which the sender parses (any value PostgreSQL holds, 'infinity'
    too, reaches the composer, which fails that delivery alone, never the statement). Its
    braces are doubled: _take_due formats the statement (sql.SQL.format)."""
    if column == "registered_at":
        return "to_json(d.registered_at) #>> '{{}}' AS registered_at"
    return f"d.{column}"


_CLAIM = f"""{_DUE_AND_CANCELLED}, claimed AS (
    UPDATE deliveries d SET status = 'sending', claimed_at = now(),
                            claim_token = gen_random_uuid(), attempts = d.attempts + 1
    FROM due WHERE d.id = due.due_id AND due.current
    RETURNING {", ".join(_returned(c.strip()) for c in DELIVERY_COLUMNS.split(","))}
)
SELECT * FROM claimed
UNION ALL SELECT {", ".join(_CANCELLED_ROW)} FROM cancelled
"""

# The development transport, in one transaction (nothing lands outside it, so no claim is
# needed): the current due deliveries are marked sent (_TO_MAILBOX), composed, and put in the
# mailbox (_BOXED) before the commit.
_MAILBOX_ROW = ("id", "status", "kind", "cpf", "name", "registered_at", "to_email", "subject")
_TO_MAILBOX = f"""{_DUE_AND_CANCELLED}, sent AS (
    UPDATE deliveries d
    SET status = 'sent', sent_at = now(), claimed_at = now(), provider = 'mailbox',
        attempts = attempts + 1, claim_token = NULL, last_error = NULL
    FROM due WHERE d.id = due.due_id AND due.current
    RETURNING {", ".join(_returned(c) for c in _MAILBOX_ROW)}, d.html, d.text, d.trace_context
)
SELECT * FROM sent
UNION ALL SELECT id, status, {", ".join(["NULL"] * (len(_MAILBOX_ROW) + 1))} FROM cancelled
"""
_BOXED = """INSERT INTO mailbox (delivery_id, to_email, from_email, subject, html, text)
SELECT id, to_email, %(sender)s, subject, html, text
FROM unnest(%(ids)s::bigint[], %(to)s::text[], %(subjects)s::text[], %(htmls)s::text[],
            %(texts)s::text[]) AS mail (id, to_email, subject, html, text)
ON CONFLICT (delivery_id) DO NOTHING"""
# A delivery whose intent cannot be composed (a kind no longer in the code) fails, with why,
# and was not sent after all.
_NOT_COMPOSED = """UPDATE deliveries d SET status = 'failed', last_error = failed.why,
    sent_at = NULL, provider = NULL
FROM unnest(%(ids)s::bigint[], %(whys)s::text[]) AS failed (id, why) WHERE d.id = failed.id"""


@dataclass(frozen=True)
class Intent:
    """An e-mail the consumer wants sent for one event, one of email.KINDS: recorded as it is,
    composed by the sender (to the address and greeting the person by the name the event
    carries)."""

    kind: str
    to_email: str
    subject: str
    name: str | None = None
    once: bool = False  # at most one per registration (email.Kind.once)


def _take_due(
    cur: psycopg.Cursor, statement: str, limit: int, values: dict[str, Any], taken: str
) -> list[dict]:
    """Run a statement of _DUE_AND_CANCELLED on up to `limit` due deliveries until it takes
    something (rows whose status is `taken`) or finds nothing due: a batch of cancellations
    alone may hide due ones behind it. The rows taken, in id order."""
    query = sql.SQL(statement).format(limit=sql.Literal(int(limit)))
    values.setdefault("skip", [])
    while True:
        cur.execute(query, values)
        rows = cur.fetchall()
        took = [row for row in rows if row["status"] == taken]
        if took or not rows:
            return sorted(took, key=lambda d: d["id"])


class NotifierStore:
    def __init__(self, pool: ConnectionPool, emails_per_address_per_day: int = 10) -> None:
        self.pool, self.daily_cap = pool, emails_per_address_per_day

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

    @contextlib.contextmanager
    def single_statement(self) -> Iterator[psycopg.Cursor]:
        """A cursor for one statement that is its own transaction (autocommit): one round trip
        where BEGIN, the statement and COMMIT would take three."""
        with self.pool.connection() as conn:
            conn.autocommit = True
            try:
                with conn.cursor(row_factory=dict_row) as cur:
                    yield cur
            finally:
                conn.autocommit = False

    # -- consumer side (called inside the handler's transaction) -------------------------------
    # Each event becomes statements whose results nobody reads, so a batch of events can be
    # queued in one pipeline and cost one round trip: the conditions live in the SQL.
    def apply_person(
        self,
        cur: psycopg.Cursor,
        envelope_id: Any,
        cpf: str,
        version: int,
        state: dict | None,
        mails: Sequence[Intent] = (),
    ) -> None:
        """Version-gated upsert of the view (a deletion is kept as a tombstone) and, if the
        event was applied, its e-mail decisions (see _APPLY_PERSON). The event's `mails`, of
        distinct kinds, all go to the address it carries and greet the name it carries."""
        if len({(mail.to_email, mail.name) for mail in mails}) > 1:
            raise ValueError("one event's e-mails go to one address and greet one name")
        row = {
            "cpf": cpf,
            "version": version,
            "bucket": sums.bucket("person", cpf),  # verification (messaging.digests)
            "contribution": sums.contribution("person", cpf, version),
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
        cur.execute(
            _APPLY_PERSON,
            {
                **row,
                "why": "the person was deleted"
                if state is None
                else "a new registration or address",
                "event_id": envelope_id,
                "to_email": mails[0].to_email if mails else None,
                "greet": mails[0].name if mails else None,
                "daily_cap": self.daily_cap,
                "trace_context": tracing.captured(),
                "kinds": [mail.kind for mail in mails],
                "subjects": [mail.subject for mail in mails],
                "once": [mail.once for mail in mails],
            },
        )

    # -- sender side ---------------------------------------------------------------------------
    def claim_due(self, limit: int, lease_seconds: float, skip: Collection[int] = ()) -> list[dict]:
        """Claim up to `limit` due deliveries in one statement, committed before anything is sent.

        A claim older than the lease belongs to a sender that died: it is claimed again, unless
        it is one of `skip` (this process sent it and is still recording the result). Due
        deliveries met on the way that a later version of the view no longer calls for are
        cancelled by the same statement (see _CLAIM), so they are never claimed.
        """
        with self.single_statement() as cur:
            return _take_due(
                cur, _CLAIM, limit, {"lease": lease_seconds, "skip": list(skip)}, "sending"
            )

    def give_back(self, deliveries: Collection[dict]) -> int:
        """Claims this worker will not send (its lease would run out first, or it stops): back to
        pending at once, their attempt given back, in one statement. Only claims still current
        (same token, still 'sending') are touched; returns how many."""
        if not deliveries:
            return 0
        with self.single_statement() as cur:
            cur.execute(
                "UPDATE deliveries d SET status = 'pending', attempts = attempts - 1, "
                "claim_token = NULL, next_attempt_at = now() "
                "FROM unnest(%s::bigint[], %s::uuid[]) AS mine (id, token) "
                "WHERE d.id = mine.id AND d.claim_token = mine.token AND d.status = 'sending'",
                ([d["id"] for d in deliveries], [d["claim_token"] for d in deliveries]),
            )
            return cur.rowcount

    # Each result is recorded only by the claim that is still current (same token, still
    # 'sending'): a worker whose lease ran out and whose delivery another worker took cannot
    # overwrite that worker's result. Each returns whether it recorded anything.
    _OWNED = "WHERE id = %(id)s AND claim_token = %(token)s AND status = 'sending'"

    def mark_sent(self, delivery: dict, provider: str, message_id: str | None) -> bool:
        return self._record(
            "UPDATE deliveries SET status = 'sent', sent_at = now(), provider = %(provider)s, "
            f"provider_message_id = %(message_id)s, last_error = NULL {self._OWNED}",
            delivery,
            provider=provider,
            message_id=message_id,
        )

    def mark_retry(
        self, delivery: dict, after_seconds: float, error: str, counts: bool = True
    ) -> bool:
        """Back to pending after a delay; `counts=False` gives the claim's attempt back."""
        return self._record(
            "UPDATE deliveries SET status = 'pending', last_error = %(error)s, "
            "attempts = attempts - %(back)s, claim_token = NULL, "
            f"next_attempt_at = now() + %(after)s * interval '1 second' {self._OWNED}",
            delivery,
            error=error,
            back=0 if counts else 1,
            after=after_seconds,
        )

    def mark_failed(self, delivery: dict, error: str) -> bool:
        return self._record(
            f"UPDATE deliveries SET status = 'failed', last_error = %(error)s {self._OWNED}",
            delivery,
            error=error,
        )

    def _record(self, statement: str, delivery: dict, **values: Any) -> bool:
        with self.single_statement() as cur:
            cur.execute(
                statement, {"id": delivery["id"], "token": delivery["claim_token"], **values}
            )
            return cur.rowcount == 1

    def deliver_due_to_mailbox(
        self,
        limit: int,
        lease_seconds: float,
        from_email: str,
        compose: Callable[[dict], Any],
    ) -> list[dict]:
        """The development transport: up to `limit` due e-mails are marked sent, composed by
        `compose` (of a delivery: its subject, html and text; email.Composer.for_delivery) and
        put in the mailbox, in one transaction of two round trips (_TO_MAILBOX, _BOXED); due
        ones met on the way that the view no longer calls for are cancelled by it, and one that
        cannot be composed fails with why (a retry would not pass; an operator may retry it).
        Returns the deliveries put in the mailbox, each with its id and trace context."""
        boxed: list[tuple[dict, Any]] = []
        failed: list[tuple[int, str]] = []
        with self.transaction(pipelined=True) as cur:
            for delivery in _take_due(cur, _TO_MAILBOX, limit, {"lease": lease_seconds}, "sent"):
                try:
                    boxed.append((delivery, compose(delivery)))
                except Exception as exc:  # pure work that will not pass on a retry: fail it
                    why = f"could not compose the e-mail: {type(exc).__name__}: {exc}"[:2000]
                    log.error("delivery %s failed: %s", delivery["id"], why)
                    failed.append((delivery["id"], why))
            if boxed:
                cur.execute(
                    _BOXED,
                    {
                        "sender": from_email,
                        "ids": [d["id"] for d, _ in boxed],
                        "to": [d["to_email"] for d, _ in boxed],
                        "subjects": [mail.subject for _, mail in boxed],
                        "htmls": [mail.html for _, mail in boxed],
                        "texts": [mail.text for _, mail in boxed],
                    },
                )
            if failed:
                cur.execute(
                    _NOT_COMPOSED,
                    {"ids": [i for i, _ in failed], "whys": [why for _, why in failed]},
                )
        return [delivery for delivery, _ in boxed]

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
            cur.execute(  # the time as text: any value PostgreSQL holds ('infinity' too)
                "SELECT cpf, name, email, status, registered_at::text, version FROM users "
                "WHERE cpf = %s AND NOT deleted",
                (cpf,),
            )
            user = cur.fetchone()
            if user is None:
                return None
            # The registration's welcome, and its latest activation e-mail (by the newest id)
            cur.execute(
                "SELECT DISTINCT ON (kind) kind, id, status, attempts, last_error, sent_at, "
                "created_at FROM deliveries WHERE cpf = %s "
                "AND registered_at IS NOT DISTINCT FROM %s::timestamptz ORDER BY kind, id DESC",
                (cpf, user["registered_at"]),
            )
            found = {row["kind"]: row for row in cur.fetchall()}
            user["welcome"], user["activation"] = found.get("welcome"), found.get("activation")
            return user

    def mailbox(self, limit: int, to: str | None = None) -> list[dict]:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT id, delivery_id, to_email, from_email, subject, html, text, "
                "received_at FROM mailbox WHERE %(to)s::text IS NULL OR lower(to_email) = "
                "lower(%(to)s) ORDER BY id DESC LIMIT %(limit)s",
                {"to": to, "limit": limit},
            )
            return cur.fetchall()

    def mail(self, mail_id: int) -> dict | None:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT id, to_email, subject, html FROM mailbox WHERE id = %s", (mail_id,))
            return cur.fetchone()

    def deliveries(self, status: str | None, limit: int, cpf: str | None = None) -> list[dict]:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT id, kind, cpf, to_email, subject, status, attempts, next_attempt_at, "
                "last_error, provider, provider_message_id, created_at, sent_at FROM deliveries "
                "WHERE (%(status)s::text IS NULL OR status = %(status)s) "
                "AND (%(cpf)s::text IS NULL OR cpf = %(cpf)s) ORDER BY id DESC LIMIT %(limit)s",
                {"status": status, "limit": limit, "cpf": cpf},
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
        """Record a process's heartbeat; `name` is `<process>@<replica>` for a replica."""
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO heartbeats (name, seen_at, stats) VALUES (%s, now(), %s) "
                "ON CONFLICT (name) DO UPDATE SET seen_at = now(), stats = EXCLUDED.stats",
                (name, Jsonb(stats) if stats is not None else None),
            )
            # Every start of a replica is a new name: forget the ones long gone.
            cur.execute(
                "DELETE FROM heartbeats WHERE seen_at < now() - %s * interval '1 second'",
                (HEARTBEAT_FORGET_SECONDS,),
            )

    def reports(self, process: str, within_seconds: float) -> dict[str, dict]:
        """replica → what it last reported, for each replica of `process` (heartbeat names
        `<process>@<replica>`, or the bare process name) that beat within `within_seconds`."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT name, coalesce(stats, '{}'::jsonb) FROM heartbeats "
                "WHERE (name = %s OR starts_with(name, %s)) "
                "AND seen_at > now() - %s * interval '1 second'",
                (process, f"{process}@", within_seconds),
            ).fetchall()
        return {name.partition("@")[2] or name: stats for name, stats in rows}

    def delivery_counts(self) -> dict[str, int]:
        """E-mail deliveries by status (pending, sending, sent, failed, cancelled)."""
        with self.pool.connection() as conn:
            return dict(
                conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status").fetchall()
            )

    # -- verification (messaging.verification.VerifiedStore) ----------------------------------
    def digests(self, entities: Collection[str]) -> sums.Digests:
        """The view's digests, summed from what it holds (a row deleted by hand is missing)."""
        if "person" not in entities:
            return {}
        with postgres_errors(), self.pool.connection() as conn:
            rows = conn.execute(  # a tombstone counts nothing (messaging.digests)
                f"SELECT bucket, sum(contribution) % {sums.MODULUS}, count(*) FROM users "
                "WHERE bucket IS NOT NULL AND NOT deleted GROUP BY bucket"
            ).fetchall()
        return {"person": {int(b): (int(d), int(n)) for b, d, n in rows}}

    def held_versions(self, entity: str, buckets: list[int]) -> dict[str, int]:
        if entity != "person":
            return {}
        with postgres_errors(), self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT cpf, version FROM users WHERE bucket = ANY(%s) AND NOT deleted",
                (buckets,),
            ).fetchall()
        return {cpf: int(version) for cpf, version in rows}

    def last_divergence(self) -> dict[str, dict[str, int]]:
        with postgres_errors(), self.pool.connection() as conn:
            row = conn.execute("SELECT divergent FROM verification WHERE name = 'view'").fetchone()
        return row[0] if row else {}

    def record_divergence(self, streaks: dict[str, dict[str, int]]) -> None:
        with self.single_statement() as cur, postgres_errors():
            cur.execute(
                "INSERT INTO verification (name, divergent) VALUES ('view', %s) "
                "ON CONFLICT (name) DO UPDATE SET divergent = EXCLUDED.divergent",
                (Jsonb(streaks),),
            )

    def ping(self) -> None:
        with self.pool.connection() as conn:
            conn.execute("SELECT 1")

    def write_probe(self) -> None:
        """Prove the database takes writes (one that answers may refuse them: read-only, disk
        full); the driver's error if it does not."""
        with self.single_statement() as cur:
            cur.execute(
                "INSERT INTO heartbeats (name, seen_at) VALUES ('write-probe', now()) "
                "ON CONFLICT (name) DO UPDATE SET seen_at = now()"
            )

    def consumer_probe(self) -> None:
        """write_probe as the consumer runtime reads it (StoreUnavailable)."""
        with postgres_errors():
            self.write_probe()
