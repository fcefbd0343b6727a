"""Bulk registration: imports stored by the API, processed in batches by the importer.

POST /person/bulk stores the import and its items (COPY) in one transaction and notifies
NOTIFY_CHANNEL. The importer claims the oldest import not done (FOR UPDATE SKIP LOCKED) and
registers its next batch through the person rules (PersonService.register_many, as POST /person
registers one) in one transaction that also advances the import's `processed` cursor and records
the failed items: a worker killed mid-batch rolls the whole batch back, so a restart resumes at
the cursor without registering anyone twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from messaging import Outbox
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from pydantic import ValidationError
from servicekit import logs
from servicekit.errors import field_errors

from .catalogue import PRODUCER
from .errors import Conflict
from .schemas import PersonIn
from .store import within

log = logging.getLogger("person.imports")

NOTIFY_CHANNEL = "person_imports"
APP_NAME = "person-importer"  # shows in pg_stat_activity

IMPORT_COLUMNS = "id::text, status, total, processed, succeeded, failed, created_at, finished_at"


class Items(Protocol):
    """An import's items as the API read them (person.bulk.BulkItems)."""

    count: int

    def texts(self) -> Iterator[str]:
        """Each item's JSON text, in order."""
        ...


class TooManyImports(Exception):
    """The key has as many imports queued as it may (429)."""


class ImportStore:
    """The API's side: store an import, read its progress. Each import belongs to its owner
    (the digest of the API key that made it): idempotency keys and reads are per owner."""

    def __init__(self, pool: ConnectionPool, max_queued: int = 3) -> None:
        self.pool, self.max_queued = pool, max_queued

    def check_room(self, owner: str, idempotency_key: str | None = None) -> None:
        """TooManyImports if the owner has `max_queued` imports not done yet, unless this is a
        resubmission (create() returns the original): asked before a body is read, in one
        snapshot, and again by create() under the owner's lock."""
        with self.pool.connection() as conn:
            queued, resubmitted = conn.execute(
                "SELECT count(*) FILTER (WHERE status <> 'done'), "
                "coalesce(bool_or(idempotency_key = %s), false) FROM imports WHERE owner = %s",
                (idempotency_key, owner),
            ).fetchone()
        if queued >= self.max_queued and not resubmitted:
            raise TooManyImports(
                f"{self.max_queued} imports of this key are not done yet: wait for one"
            )

    def create(
        self, items: Items, idempotency_key: str | None, owner: str = ""
    ) -> tuple[dict, bool]:
        """Store an import of `items`; (its row, True), or (the existing one, False) when an
        import with this idempotency key exists already (its items are not compared).
        TooManyImports when the owner has `max_queued` imports not done yet."""
        import_id = uuid.uuid4()
        with (
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            existing = _keyed(cur, owner, idempotency_key)
            if existing is not None:
                return existing, False
            # One owner's imports queue one at a time through this lock, so the count holds.
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('imports:' || %s, 0))", (owner,)
            )
            # A retry that raced its original waited for the lock until the original committed:
            # it gets the original, which the count below would otherwise refuse as one too many.
            existing = _keyed(cur, owner, idempotency_key)
            if existing is not None:
                return existing, False
            cur.execute(
                "SELECT count(*) AS queued FROM imports WHERE owner = %s AND status <> 'done'",
                (owner,),
            )
            if cur.fetchone()["queued"] >= self.max_queued:
                raise TooManyImports(
                    f"{self.max_queued} imports of this key are not done yet: wait for one"
                )
            cur.execute(
                f"INSERT INTO imports (id, owner, idempotency_key, total) VALUES (%s, %s, %s, %s) "
                f"ON CONFLICT (owner, idempotency_key) DO NOTHING RETURNING {IMPORT_COLUMNS}",
                (import_id, owner, idempotency_key, items.count),
            )
            row = cur.fetchone()
            if row is None:  # the key was taken meanwhile (ON CONFLICT waited for it)
                return _keyed(cur, owner, idempotency_key), False
            with cur.copy("COPY import_items (import_id, idx, item) FROM STDIN") as copy:
                for index, text in enumerate(items.texts()):
                    copy.write_row((import_id, index, text))
            cur.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(import_id)))
            return row, True

    def get(self, import_id: str, limit: int, owner: str = "") -> dict | None:
        """The owner's import with its first `limit` failures (by index), or None."""
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                f"SELECT {IMPORT_COLUMNS} FROM imports WHERE id = %s AND owner = %s",
                (import_id, owner),
            )
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute(
                "SELECT idx, errors FROM import_failures WHERE import_id = %s "
                "ORDER BY idx LIMIT %s",
                (import_id, limit),
            )
            row["failures"] = [
                {"index": f["idx"], "errors": json.loads(f["errors"])} for f in cur.fetchall()
            ]
            return row


def _keyed(cur: psycopg.Cursor, owner: str, idempotency_key: str | None) -> dict | None:
    """The owner's import made with this idempotency key, if any."""
    if idempotency_key is None:
        return None
    cur.execute(
        f"SELECT {IMPORT_COLUMNS} FROM imports WHERE owner = %s AND idempotency_key = %s",
        (owner, idempotency_key),
    )
    return cur.fetchone()


# Failed items kept per import (all are counted): a payload of 100,000 bad items stores no
# more than this many reasons.
MAX_FAILURES_KEPT = 10_000


@dataclass(frozen=True)
class ImporterSettings:
    database_url: str
    batch_size: int = 500
    poll_interval: float = 1.0
    retry_interval: float = 2.0


class Importer:
    """The import worker: run() until stop(); each batch is one transaction."""

    def __init__(self, settings: ImporterSettings) -> None:
        self.settings = settings
        self.outbox = Outbox(PRODUCER)
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        log.info("importer started (batches of %d)", self.settings.batch_size)
        while not self._stop.is_set():
            try:
                self._serve()
            except psycopg.OperationalError as exc:
                log.warning("database unavailable (%s); retrying", exc)
                self._stop.wait(self.settings.retry_interval)
            except Exception:  # a batch that keeps failing is retried, and logged each time
                log.exception("import batch failed; retrying")
                self._stop.wait(self.settings.retry_interval)
        log.info("importer stopped")

    def _serve(self) -> None:
        url = self.settings.database_url
        with (
            psycopg.connect(url, application_name=APP_NAME) as work,
            psycopg.connect(url, autocommit=True, application_name=APP_NAME) as listen,
        ):
            listen.execute(f"LISTEN {NOTIFY_CHANNEL}")
            while not self._stop.is_set():
                if self.step(work):
                    continue
                self._idle(listen)

    def _idle(self, listen: psycopg.Connection) -> None:
        """Wait for a new import's NOTIFY, at most poll_interval; a stop ends it within 0.5s."""
        deadline = time.monotonic() + self.settings.poll_interval
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if any(True for _ in listen.notifies(timeout=min(left, 0.5), stop_after=1)):
                return

    def step(self, conn: psycopg.Connection) -> bool:
        """Process the next batch of the oldest unfinished import; False if there is none."""
        try:
            return self._batch(conn, careful=False)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # An item the database refuses despite validation: redo the batch with a savepoint
            # per item, so that it fails alone instead of the batch failing forever.
            log.warning("batch refused by the database (%s); retrying item by item", exc)
            return self._batch(conn, careful=True)

    def _batch(self, conn: psycopg.Connection, careful: bool) -> bool:
        with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT id, total, processed, failed FROM imports WHERE status <> 'done' "
                "ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED"
            )
            claimed = cur.fetchone()
            if claimed is None:
                return False
            import_id = claimed["id"]
            binding = logs.correlation_id.set(str(import_id))
            try:
                cur.execute(
                    "SELECT idx, item FROM import_items WHERE import_id = %s AND idx >= %s "
                    "ORDER BY idx LIMIT %s",
                    (import_id, claimed["processed"], self.settings.batch_size),
                )
                items = cur.fetchall()
                errors = self._register(cur, items, str(import_id), careful)
                failures = [(import_id, idx, json.dumps(reasons)) for idx, reasons in errors]
                room = max(0, MAX_FAILURES_KEPT - claimed["failed"])
                if failures[:room]:
                    cur.executemany(
                        "INSERT INTO import_failures (import_id, idx, errors) "
                        "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                        failures[:room],
                    )
                processed = claimed["processed"] + len(items)
                done = not items or processed >= claimed["total"]
                cur.execute(
                    "UPDATE imports SET processed = %s, succeeded = succeeded + %s, "
                    "failed = failed + %s, status = %s, "
                    "finished_at = CASE WHEN %s THEN now() END WHERE id = %s",
                    (
                        processed,
                        len(items) - len(failures),
                        len(failures),
                        "done" if done else "running",
                        done,
                        import_id,
                    ),
                )
                if done:
                    cur.execute("DELETE FROM import_items WHERE import_id = %s", (import_id,))
                    log.info("import %s done: %d items", import_id, claimed["total"])
            finally:
                logs.correlation_id.reset(binding)
        return True

    def _register(
        self, cur: psycopg.Cursor, items: list[dict], correlation_id: str, careful: bool
    ) -> list[tuple[int, dict[str, list[str]]]]:
        """Validate the items as POST /person does and register the valid ones through the
        person rules, in the batch's transaction; the failures (index, reasons per field), in
        index order."""
        people = within(cur, self.outbox)
        failures: dict[int, dict[str, list[str]]] = {}
        valid: list[tuple[int, dict[str, Any]]] = []
        for item in items:
            reasons, fields = _validated(item["item"])
            if reasons:
                failures[item["idx"]] = reasons
            else:
                valid.append((item["idx"], fields))
        if careful:  # a savepoint per person, so that one the database refuses fails alone
            for index, fields in valid:
                try:
                    outcome = people.register_many([fields], correlation_id)
                except (psycopg.DataError, psycopg.IntegrityError) as exc:
                    reason = exc.diag.message_primary or str(exc)
                    failures[index] = {"body": [f"refused by the database: {reason}"]}
                else:
                    failures |= _conflicts([index], outcome)
        else:
            outcome = people.register_many([fields for _, fields in valid], correlation_id)
            failures |= _conflicts([index for index, _ in valid], outcome)
        return sorted(failures.items())


def _validated(text: str) -> tuple[dict[str, list[str]] | None, dict[str, Any]]:
    try:
        body = json.loads(text)
    except ValueError:
        return {"body": ["not valid JSON"]}, {}
    if not isinstance(body, dict):
        return {"body": ["must be a JSON object"]}, {}
    try:
        return None, PersonIn.model_validate(body).model_dump()
    except ValidationError as exc:
        return field_errors(exc), {}


def _conflicts(indexes: list[int], outcome: list[dict | Conflict]) -> dict[int, dict]:
    """The items the person rules refused, each with the reason POST /person's 409 gives."""
    return {
        index: {"cpf": [str(refused)]}
        for index, refused in zip(indexes, outcome, strict=True)
        if isinstance(refused, Conflict)
    }
