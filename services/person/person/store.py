"""All SQL of the person service: each write commits its row change and its outbox event."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

import psycopg
from messaging import Outbox
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from .errors import BadToken, Conflict, NotFound, TooSoon, Unprocessable
from .events import PRODUCER, item_state, person_state

PERSON_COLUMNS = "cpf, name, address, date_of_birth, email, status, created_at, updated_at"
EDITABLE = ("name", "address", "date_of_birth", "email")


class Store(Protocol):
    """What the API needs from storage; PgStore and memory.MemoryStore both provide it."""

    def create_person(self, fields: dict[str, Any], correlation_id: str | None) -> dict: ...
    def get_person(self, cpf: str) -> dict: ...
    def update_person(
        self, cpf: str, changes: dict[str, Any], correlation_id: str | None
    ) -> dict: ...
    def delete_person(self, cpf: str, correlation_id: str | None) -> None: ...
    def add_item(
        self, cpf: str, kind: str, type_: str | None, value: Decimal, correlation_id: str | None
    ) -> dict: ...
    def delete_item(
        self, cpf: str, kind: str, item_id: str, correlation_id: str | None
    ) -> None: ...
    def activate(
        self, cpf: str, email: str, registered_at: datetime, correlation_id: str | None
    ) -> bool: ...
    def request_activation(
        self, cpf: str, correlation_id: str | None, resend_seconds: float = 0.0
    ) -> dict: ...
    def ping(self) -> None: ...
    def outbox_backlog(self) -> tuple[int, float]: ...
    def outbox_published(self) -> tuple[int, float | None]: ...


class PgStore:
    """The person store on PostgreSQL, through a connection pool."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.outbox = Outbox(PRODUCER)

    # -- reads ---------------------------------------------------------------------------------
    def get_person(self, cpf: str) -> dict:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            person = _fetch_person(cur, cpf)
            return _with_items(person, _items(cur, cpf))

    def ping(self) -> None:
        with self.pool.connection() as conn:
            conn.execute("SELECT 1")

    def outbox_published(self) -> tuple[int, float | None]:
        """Events the relay has published, and when it last did (epoch seconds)."""
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT published, extract(epoch FROM last_published_at) "
                "FROM messaging_relay_stats WHERE name = 'relay'"
            ).fetchone()
        return (int(row[0]), float(row[1]) if row[1] is not None else None) if row else (0, None)

    def outbox_backlog(self) -> tuple[int, float]:
        """Unpublished events and the age in seconds of the oldest one."""
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT count(*), coalesce(extract(epoch FROM now() - min(occurred_at)), 0) "
                "FROM messaging_outbox WHERE published_at IS NULL"
            ).fetchone()
        return int(row[0]), float(row[1])

    # -- writes --------------------------------------------------------------------------------
    def create_person(self, fields: dict[str, Any], correlation_id: str | None) -> dict:
        with self._tx() as cur:
            inserted = insert_people(cur, self.outbox, [fields], correlation_id)
            if not inserted:
                raise Conflict(f"a person with CPF {fields['cpf']} already exists")
        return _with_items(inserted[fields["cpf"]], [])

    def update_person(self, cpf: str, changes: dict[str, Any], correlation_id: str | None) -> dict:
        with self._tx() as cur:
            current = _fetch_person(cur, cpf, lock=True)
            changed = {k: v for k, v in changes.items() if k in EDITABLE and current[k] != v}
            if changed:
                sets = ", ".join(f"{column} = %({column})s" for column in changed)
                cur.execute(
                    f"UPDATE person SET {sets}, updated_at = now() WHERE cpf = %(cpf)s "
                    f"RETURNING {PERSON_COLUMNS}",
                    {**changed, "cpf": cpf},
                )
                current = cur.fetchone()
                self._event(cur, "person", cpf, "updated", person_state(current), correlation_id)
            return _with_items(current, _items(cur, cpf))  # this write's state, not a later one

    def delete_person(self, cpf: str, correlation_id: str | None) -> None:
        with self._tx() as cur:
            _person_gate(cur, cpf, exclusive=True)
            _fetch_person(cur, cpf, lock=True)
            cur.execute("DELETE FROM item WHERE cpf = %s RETURNING id, kind", (cpf,))
            for item in cur.fetchall():
                self._event(cur, item["kind"], str(item["id"]), "deleted", None, correlation_id)
            cur.execute("DELETE FROM person WHERE cpf = %s", (cpf,))
            self._event(cur, "person", cpf, "deleted", None, correlation_id)

    def add_item(
        self, cpf: str, kind: str, type_: str | None, value: Decimal, correlation_id: str | None
    ) -> dict:
        with self._tx() as cur:
            # Item writes to one person go in parallel; a deletion waits for them and they for
            # it. The advisory gate queues fairly, so a stream of item writes cannot starve a
            # deletion, as row-level KEY SHARE locks alone would.
            _person_gate(cur, cpf, exclusive=False)
            _fetch_person(cur, cpf, lock="KEY SHARE")
            cur.execute(
                "INSERT INTO item (id, cpf, kind, type, value) VALUES (%s, %s, %s, %s, %s) "
                "RETURNING id, cpf, kind, type, value",
                (uuid.uuid4(), cpf, kind, type_, value),
            )
            item = cur.fetchone()
            self._event(cur, kind, str(item["id"]), "created", item_state(item), correlation_id)
        return item

    def delete_item(self, cpf: str, kind: str, item_id: str, correlation_id: str | None) -> None:
        with self._tx() as cur:
            cur.execute(
                "DELETE FROM item WHERE id = %s AND cpf = %s AND kind = %s RETURNING id",
                (item_id, cpf, kind),
            )
            if cur.fetchone() is None:
                raise NotFound(f"no {kind} {item_id} for CPF {cpf}")
            self._event(cur, kind, item_id, "deleted", None, correlation_id)

    def activate(
        self, cpf: str, email: str, registered_at: datetime, correlation_id: str | None
    ) -> bool:
        """Set the person active; False if already active. The token's e-mail must be current."""
        with self._tx() as cur:
            person = _fetch_person(cur, cpf, lock=True)
            if person["created_at"] != registered_at:
                raise BadToken("the link was issued for an earlier registration")
            if person["email"] is None or person["email"].lower() != email.lower():
                raise BadToken("the link was issued for another e-mail address")
            if person["status"] == "active":
                return False
            cur.execute(
                f"UPDATE person SET status = 'active', updated_at = now() WHERE cpf = %s "
                f"RETURNING {PERSON_COLUMNS}",
                (cpf,),
            )
            self._event(cur, "person", cpf, "updated", person_state(cur.fetchone()), correlation_id)
            return True

    def request_activation(
        self, cpf: str, correlation_id: str | None, resend_seconds: float = 0.0
    ) -> dict:
        with self._tx() as cur:
            person = _fetch_person(cur, cpf, lock=True)
            _check_can_activate(person)
            cur.execute(
                "SELECT extract(epoch FROM now() - coalesce(activation_requested_at, created_at))"
                " AS since FROM person WHERE cpf = %s",
                (cpf,),
            )
            _check_resend(float(cur.fetchone()["since"]), resend_seconds)
            cur.execute("UPDATE person SET activation_requested_at = now() WHERE cpf = %s", (cpf,))
            self._event(
                cur, "person", cpf, "activation_requested", person_state(person), correlation_id
            )
            return person

    # -- helpers -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self) -> Iterator[psycopg.Cursor]:
        """One transaction on a pooled connection: commit on success, roll back on error."""
        with (
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            yield cur

    def _event(
        self,
        cur: psycopg.Cursor,
        entity: str,
        entity_id: str,
        change: str,
        data: dict | None,
        correlation_id: str | None,
    ) -> None:
        self.outbox.add(
            cur,
            entity=entity,
            entity_id=entity_id,
            change=change,
            data=data,
            correlation_id=correlation_id,
        )


def insert_people(
    cur: psycopg.Cursor,
    outbox: Outbox,
    people: list[dict[str, Any]],
    correlation_id: str | None,
) -> dict[str, dict]:
    """Insert validated people, each with its `person.created` event, in the cursor's transaction.

    Returns the inserted rows by CPF; a CPF that exists already (also when a concurrent
    transaction inserted it: ON CONFLICT waits for it) is left out, without aborting the
    transaction. CPFs must be distinct. POST /person (one person) and the importer (a batch)
    share it: a few statements per batch instead of three round trips per person.
    """
    if not people:
        return {}
    columns = ("cpf", "name", "address", "date_of_birth", "email")
    cur.execute(
        # %b: arrays sent in binary, without escaping each element as text.
        f"INSERT INTO person (cpf, name, address, date_of_birth, email) "
        f"SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::date[], %b::text[]) "
        f"ON CONFLICT (cpf) DO NOTHING RETURNING {PERSON_COLUMNS}",
        [[p[column] for p in people] for column in columns],
    )
    inserted = {row["cpf"]: row for row in cur.fetchall()}
    if inserted:
        outbox.add_many(
            cur,
            entity="person",
            change="created",
            data={cpf: person_state(row) for cpf, row in inserted.items()},
            correlation_id=correlation_id,
        )
    return inserted


def _person_gate(cur: psycopg.Cursor, cpf: str, exclusive: bool) -> None:
    lock = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    cur.execute(f"SELECT {lock}(hashtextextended('person:' || %s, 0))", (cpf,))


def _items(cur: psycopg.Cursor, cpf: str) -> list[dict]:
    cur.execute(
        "SELECT id, kind, type, value FROM item WHERE cpf = %s ORDER BY created_at, id", (cpf,)
    )
    return cur.fetchall()


def _fetch_person(cur: psycopg.Cursor, cpf: str, lock: bool | str = False) -> dict:
    clause = {False: "", True: " FOR UPDATE", "KEY SHARE": " FOR KEY SHARE"}[lock]
    cur.execute(f"SELECT {PERSON_COLUMNS} FROM person WHERE cpf = %s{clause}", (cpf,))
    person = cur.fetchone()
    if person is None:
        raise NotFound(f"no person with CPF {cpf}")
    return person


def _check_can_activate(person: dict) -> None:
    if person["email"] is None:
        raise Unprocessable("email", "the person has no e-mail address to send a link to")
    if person["status"] == "active":
        raise Conflict("the account is already active")


def _check_resend(since: float, resend_seconds: float) -> None:
    """A new activation e-mail only `resend_seconds` after the registration or the last one."""
    if since < resend_seconds:
        raise TooSoon(
            f"an activation e-mail was sent {since:.0f}s ago: ask again in "
            f"{resend_seconds - since:.0f}s",
            resend_seconds - since,
        )


def _with_items(person: dict, items: list[dict]) -> dict:
    out = dict(person)
    for kind in ("income", "asset", "debt"):
        out[f"{kind}s"] = [
            {"id": str(i["id"]), "type": i["type"], "value": str(i["value"])}
            for i in items
            if i["kind"] == kind
        ]
    return out
