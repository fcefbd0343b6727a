"""Idempotent apply helpers: duplicates and reordering are rejected by a constraint or a script.

- `upsert_if_newer`: a PostgreSQL upsert that only overwrites an older version of the row.
- `Inbox`: one (consumer, event_id) row per handled event, claimed in the handler's transaction.
- `RedisVersionGate`: a Lua compare-and-set of a versioned value in one round trip.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql

INBOX_SQL = """
CREATE TABLE IF NOT EXISTS messaging_inbox (
    consumer    text        NOT NULL,
    event_id    uuid        NOT NULL,
    handled_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
"""


def upsert_if_newer(
    cur: psycopg.Cursor,
    table: str,
    key: Sequence[str],
    row: Mapping[str, Any],
    version_column: str = "version",
) -> bool:
    """Insert the row, or overwrite the stored one only if it holds an older version.

    Returns True if the row was written. A duplicate or out-of-date event changes nothing.
    A deletion is written the same way, as a tombstone row, so that a late event of the
    deleted entity cannot bring it back.
    """
    query = upsert_if_newer_query(table, tuple(key), tuple(row), version_column)
    cur.execute(query, dict(row))
    return cur.rowcount == 1


@functools.lru_cache(maxsize=64)
def upsert_if_newer_query(
    table: str, key: tuple[str, ...], columns: tuple[str, ...], version_column: str = "version"
) -> str:
    """The statement of `upsert_if_newer`, with a named placeholder per column, for callers that
    extend it (`... RETURNING` in a CTE) or queue it in a pipeline without reading its result.

    Rendered to text once: psycopg would otherwise compose the identifiers on every execute.
    """
    updates = [c for c in columns if c not in key]
    return (
        sql.SQL(
            "INSERT INTO {table} ({cols}) VALUES ({vals}) ON CONFLICT ({key}) "
            "DO UPDATE SET {sets} WHERE {table}.{ver} < EXCLUDED.{ver}"
        )
        .format(
            table=sql.Identifier(table),
            cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
            vals=sql.SQL(", ").join(map(sql.Placeholder, columns)),
            key=sql.SQL(", ").join(map(sql.Identifier, key)),
            sets=sql.SQL(", ").join(
                sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in updates
            ),
            ver=sql.Identifier(version_column),
        )
        .as_string(None)
    )


class Inbox:
    """Remembers which events a consumer has handled, in the consumer's own database."""

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer

    @staticmethod
    def install(conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute(INBOX_SQL)

    def claim(self, cur: psycopg.Cursor, event_id: Any) -> bool:
        """Claim the event in the caller's transaction; False if it was handled before."""
        cur.execute(
            "INSERT INTO messaging_inbox (consumer, event_id) VALUES (%s, %s) "
            "ON CONFLICT DO NOTHING",
            (self.consumer, event_id),
        )
        return cur.rowcount == 1


# KEYS[1]: the entity's hash. ARGV: version, payload ('' for a deletion's tombstone).
_GATE_LUA = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local incoming = tonumber(ARGV[1])
if stored >= incoming then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'data', ARGV[2], 'deleted', ARGV[3])
return 1
"""


class RedisVersionGate:
    """Stores `data` under a key only if its version is newer than the stored one."""

    def __init__(self, client: Any) -> None:
        self._script = client.register_script(_GATE_LUA)

    def apply(self, key: str, version: int, data: str | None, client: Any = None) -> bool:
        """Write the new state (None: a tombstone); False if the stored version is not older."""
        args = [version, data or "", "1" if data is None else "0"]
        return bool(self._script(keys=[key], args=args, client=client))
