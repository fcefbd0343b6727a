"""The person store on PostgreSQL: the SQL and the locks of the person rules (service.py).

Each unit of work is one transaction on a pooled connection; the outbox row of every event is
written through the same cursor as the change it describes, so both commit or neither does.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
from messaging import Envelope, Outbox
from messaging.outbox import backlog, history, parked, parked_count, published
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from servicekit import tracing

from .catalogue import PRODUCER, Event, EventType, person_data
from .service import ITEMS_PER_PERSON_MAX, Lock, PersonService

PERSON_COLUMNS = "cpf, name, address, date_of_birth, email, status, created_at, updated_at"
INSERTED = ("cpf", "name", "address", "date_of_birth", "email")  # what a registration gives
_LOCKS = {None: "", "update": " FOR UPDATE", "key share": " FOR KEY SHARE"}


class _Later(str):
    """A value the database fills in (see _REGISTER): its place in the event's JSON."""

    def isoformat(self) -> str:
        return str(self)


# A registration in one statement. The event is built and validated here (Envelope, PersonData)
# with placeholders for what only the database knows: the entity's version (allocated as in
# messaging.outbox.next_version) and the row's created_at/updated_at (its now()). The statement
# puts them into the body's text: each placeholder is a key and value whose quotes are not
# escaped, which no string inside the JSON can spell. The timestamps are written as Python's
# isoformat() writes the datetimes psycopg reads (the session's time zone), so the body is what
# insert_person + Outbox.add would have written. No row is inserted when the CPF exists: the
# version and outbox inserts read the person insert's RETURNING.
_LATER_VERSION = 2**63 - 1
_LATER_CREATED_AT = _Later("@@created_at@@")
_LATER_UPDATED_AT = _Later("@@updated_at@@")


def _iso(column: str) -> str:
    return (
        f"""to_char({column}, 'YYYY-MM-DD"T"HH24:MI:SS') || CASE WHEN """
        f"extract(microseconds FROM {column})::bigint %% 1000000 <> 0 "
        f"THEN to_char({column}, '.US') ELSE '' END || to_char({column}, 'TZH:TZM')"
    )


_REGISTER = f"""
WITH p AS (
    INSERT INTO person (cpf, name, address, date_of_birth, email)
    VALUES (%(cpf)s, %(name)s, %(address)s, %(date_of_birth)s, %(email)s)
    ON CONFLICT (cpf) DO NOTHING RETURNING {PERSON_COLUMNS}
), v AS (
    INSERT INTO messaging_entity_versions (entity, entity_id, version)
    SELECT %(entity)s, cpf, 1 FROM p
    ON CONFLICT (entity, entity_id)
    DO UPDATE SET version = messaging_entity_versions.version + 1
    RETURNING version
), o AS (
    INSERT INTO messaging_outbox (event_id, event_type, entity, entity_id, entity_version,
                                  occurred_at, correlation_id, body, trace_context)
    SELECT %(event_id)s, %(event_type)s, %(entity)s, p.cpf, v.version, %(occurred_at)s,
           %(correlation_id)s,
           replace(replace(replace(%(body)s,
               '"entity_version":{_LATER_VERSION}', '"entity_version":' || v.version),
               '"created_at":"{_LATER_CREATED_AT}"',
               '"created_at":"' || {_iso("p.created_at")} || '"'),
               '"updated_at":"{_LATER_UPDATED_AT}"',
               '"updated_at":"' || {_iso("p.updated_at")} || '"'),
           %(trace_context)s
    FROM p, v
)
SELECT {PERSON_COLUMNS} FROM p
"""


class PgUnitOfWork:
    """service.UnitOfWork over one transaction's cursor."""

    def __init__(self, cur: psycopg.Cursor, events: Outbox) -> None:
        self.cur, self.events = cur, events

    def person(self, cpf: str, lock: Lock = None) -> dict | None:
        self.cur.execute(
            f"SELECT {PERSON_COLUMNS} FROM person WHERE cpf = %s{_LOCKS[lock]}", (cpf,)
        )
        return self.cur.fetchone()

    def items(self, cpf: str) -> list[dict]:
        self.cur.execute(
            "SELECT id, kind, type, value FROM item WHERE cpf = %s ORDER BY created_at, id",
            (cpf,),
        )
        return self.cur.fetchall()

    def count_items(self, cpf: str) -> int:
        self.cur.execute("SELECT count(*) AS n FROM item WHERE cpf = %s", (cpf,))
        return self.cur.fetchone()["n"]

    def gate(self, cpf: str, exclusive: bool) -> None:
        # An advisory lock per person that queues fairly: a stream of item writes (shared)
        # cannot starve a deletion (exclusive), as row-level KEY SHARE locks alone would.
        lock = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        self.cur.execute(f"SELECT {lock}(hashtextextended('person:' || %s, 0))", (cpf,))

    def insert_person(self, fields: dict[str, Any]) -> dict | None:
        # One row: plain parameters (the bulk path's arrays cost more to send for one).
        self.cur.execute(
            "INSERT INTO person (cpf, name, address, date_of_birth, email) "
            "VALUES (%(cpf)s, %(name)s, %(address)s, %(date_of_birth)s, %(email)s) "
            f"ON CONFLICT (cpf) DO NOTHING RETURNING {PERSON_COLUMNS}",
            {column: fields[column] for column in INSERTED},
        )
        return self.cur.fetchone()

    def insert_people(self, people: Sequence[dict[str, Any]]) -> dict[str, dict]:
        # CPFs are distinct; one that exists (also when a concurrent transaction inserted it:
        # ON CONFLICT waits for it) is left out without aborting the transaction.
        if not people:
            return {}
        self.cur.execute(
            # %b: arrays sent in binary, without escaping each element as text.
            "INSERT INTO person (cpf, name, address, date_of_birth, email) "
            "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::date[], %b::text[]) "
            f"ON CONFLICT (cpf) DO NOTHING RETURNING {PERSON_COLUMNS}",
            [[fields[column] for fields in people] for column in INSERTED],
        )
        return {row["cpf"]: row for row in self.cur.fetchall()}

    def register(self, fields: dict[str, Any], correlation_id: str | None) -> dict | None:
        """insert_person and emit(person.created) as one statement (_REGISTER): the person row,
        the entity's next version and the outbox row, or nothing at all on a duplicate CPF."""
        envelope = Envelope.new(
            event_type=EventType.PERSON_CREATED,
            entity_id=fields["cpf"],
            entity_version=_LATER_VERSION,
            data=person_data(
                {
                    **fields,
                    "status": "pending",
                    "created_at": _LATER_CREATED_AT,
                    "updated_at": _LATER_UPDATED_AT,
                }
            ).model_dump(mode="json"),
            producer=self.events.producer,
            correlation_id=correlation_id,
        )
        self.cur.execute(
            _REGISTER,
            {
                **{column: fields[column] for column in INSERTED},
                "event_id": envelope.event_id,
                "event_type": envelope.event_type,
                "entity": envelope.entity,
                "occurred_at": envelope.occurred_at,
                "correlation_id": envelope.correlation_id,
                "body": envelope.to_json().decode(),
                "trace_context": tracing.captured(),
            },
        )
        return self.cur.fetchone()

    def update_person(self, cpf: str, changes: dict[str, Any]) -> dict:
        sets = ", ".join(f"{column} = %({column})s" for column in changes)
        self.cur.execute(
            f"UPDATE person SET {sets}, updated_at = now() WHERE cpf = %(cpf)s "
            f"RETURNING {PERSON_COLUMNS}",
            {**changes, "cpf": cpf},
        )
        return self.cur.fetchone()

    def delete_items(self, cpf: str) -> list[dict]:
        self.cur.execute("DELETE FROM item WHERE cpf = %s RETURNING id, kind", (cpf,))
        return self.cur.fetchall()

    def delete_person(self, cpf: str) -> None:
        self.cur.execute("DELETE FROM person WHERE cpf = %s", (cpf,))

    def insert_item(self, cpf: str, kind: str, type_: str | None, value: Decimal) -> dict:
        self.cur.execute(
            "INSERT INTO item (id, cpf, kind, type, value) VALUES (%s, %s, %s, %s, %s) "
            "RETURNING id, cpf, kind, type, value",
            (uuid.uuid4(), cpf, kind, type_, value),
        )
        return self.cur.fetchone()

    def delete_item(self, cpf: str, kind: str, item_id: str) -> bool:
        self.cur.execute(
            "DELETE FROM item WHERE id = %s AND cpf = %s AND kind = %s RETURNING id",
            (item_id, cpf, kind),
        )
        return self.cur.fetchone() is not None

    def seconds_since_activation_mail(self, cpf: str) -> float:
        self.cur.execute(
            "SELECT extract(epoch FROM now() - coalesce(activation_requested_at, created_at))"
            " AS since FROM person WHERE cpf = %s",
            (cpf,),
        )
        return float(self.cur.fetchone()["since"])

    def mark_activation_requested(self, cpf: str) -> None:
        self.cur.execute("UPDATE person SET activation_requested_at = now() WHERE cpf = %s", (cpf,))

    def count_activation_request(self, key_digest: str, most: int) -> bool:
        # One row per key and UTC day, counted up under its row lock while under `most`; the
        # key's rows of earlier days go.
        self.cur.execute(
            "DELETE FROM activation_quota WHERE key_digest = %(key)s "
            "AND day < (now() AT TIME ZONE 'UTC')::date",
            {"key": key_digest},
        )
        self.cur.execute(
            "INSERT INTO activation_quota AS q (key_digest, day, requests) "
            "VALUES (%(key)s, (now() AT TIME ZONE 'UTC')::date, 1) "
            "ON CONFLICT (key_digest, day) DO UPDATE SET requests = q.requests + 1 "
            "WHERE q.requests < %(most)s RETURNING requests",
            {"key": key_digest, "most": most},
        )
        return self.cur.fetchone() is not None

    def emit(self, event: Event, correlation_id: str | None) -> None:
        self.events.add(
            self.cur,
            event_type=event.type,
            entity_id=event.entity_id,
            data=event.payload(),
            correlation_id=correlation_id,
        )

    def emit_many(self, events: Sequence[Event], correlation_id: str | None) -> None:
        # One statement per event type, of distinct entities (the outbox's add_many).
        by_type = itertools.groupby(sorted(events, key=lambda e: e.type), key=lambda e: e.type)
        for event_type, group in by_type:
            same_type = list(group)
            data = {event.entity_id: event.payload() for event in same_type}
            if len(data) != len(same_type):
                raise ValueError(f"emit_many: two {event_type} events of one entity")
            self.events.add_many(
                self.cur, event_type=event_type, data=data, correlation_id=correlation_id
            )


def within(cur: psycopg.Cursor, events: Outbox) -> PersonService:
    """The person rules inside a transaction the caller holds on `cur` (an import's batch,
    with its own bookkeeping): each operation is a savepoint of it, committed with the caller's
    writes, and one that raises rolls back alone."""

    @contextlib.contextmanager
    def savepoint() -> Iterator[PgUnitOfWork]:
        with cur.connection.transaction():
            yield PgUnitOfWork(cur, events)

    return PersonService(savepoint)


class PgStore(PersonService):
    """The person rules over PostgreSQL, through a connection pool."""

    def __init__(
        self, pool: ConnectionPool, items_per_person_max: int = ITEMS_PER_PERSON_MAX
    ) -> None:
        self.pool = pool
        self.outbox = Outbox(PRODUCER)
        super().__init__(
            self._transaction, self._single_statement, items_per_person_max=items_per_person_max
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[PgUnitOfWork]:
        """One transaction on a pooled connection: commit on success, roll back on error."""
        with (
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            yield PgUnitOfWork(cur, self.outbox)

    @contextlib.contextmanager
    def _single_statement(self) -> Iterator[PgUnitOfWork]:
        """A unit of work of one statement, its own transaction (autocommit, synchronous commit
        as any other): one round trip where BEGIN, the statement and COMMIT take three."""
        with self.pool.connection() as conn:
            conn.autocommit = True
            try:
                with conn.cursor(row_factory=dict_row) as cur:
                    yield PgUnitOfWork(cur, self.outbox)
            finally:
                conn.autocommit = False

    def ping(self) -> None:
        with self.pool.connection() as conn:
            conn.execute("SELECT 1")

    def outbox_backlog(self) -> tuple[int, float, int]:
        """Events waiting, the age of the oldest, and the rows the relay parked."""
        with self.pool.connection() as conn:
            return (*backlog(conn), parked_count(conn))

    def outbox_published(self) -> tuple[int, float | None]:
        with self.pool.connection() as conn:
            return published(conn)

    def outbox_status(self, parked_limit: int) -> dict[str, Any]:
        """What the relay has to do and did: the backlog and the age of its oldest event, the
        events published and when last, and the rows it parked (the oldest `parked_limit`)."""
        with self.pool.connection() as conn:
            waiting, oldest = backlog(conn)
            count, last = published(conn)
            rows = parked(conn, limit=parked_limit)
            total = parked_count(conn) if len(rows) == parked_limit else len(rows)
        return {
            "backlog": waiting,
            "oldest_age_seconds": oldest,
            "published": count,
            "last_published_at": None if last is None else datetime.fromtimestamp(last, UTC),
            "parked_count": total,
            "parked": rows,
        }

    def outbox_history(
        self, cpf: str | None, correlation_id: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """The events still in the outbox about a person and their items (their data names the
        CPF), or made by one request, oldest first."""
        with self.pool.connection() as conn:
            return history(
                conn,
                entity_ids=[cpf] if cpf else None,
                correlation_id=correlation_id,
                data_field=("cpf", cpf) if cpf else None,
                limit=limit,
            )
