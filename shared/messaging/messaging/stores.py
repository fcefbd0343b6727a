"""What every read model's store adapter needs, for PostgreSQL and Redis.

- Error translation (habit: at the adapter): a store that is away *or answers but refuses
  writes* raises `StoreUnavailable` (the consumer runtime holds its batch and waits: no message's
  fault), a transient conflict `RetryableError`, data the store cannot hold `PermanentError`.
- A version gate: apply an entity's change only if its version is newer than the one held, in
  one atomic step that may also update the model's own fields.
- A write probe: an answering store may refuse writes (read-only, out of memory, disk full), so
  the probe the runtime waits on must write.

Redis is optional (`pip install messaging[redis]`); nothing here imports it until used.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
from psycopg import sql

from .errors import PermanentError, RetryableError, StoreUnavailable

# SQLSTATEs of a database that is away or answers but cannot take writes now: classes 08
# connection, 53 resources (disk full, too many connections), 57 operator intervention
# (shutdown, a statement timeout), 58 system errors; and 25006, a read-only transaction (a
# standby, default_transaction_read_only).
_PG_OUTAGE_CLASSES = ("08", "53", "57", "58")
_PG_READ_ONLY = "25006"


@contextlib.contextmanager
def postgres_errors() -> Iterator[None]:
    """Translate psycopg's errors, inside this block, into the runtime's.

    A database that is away or answers but refuses writes (connection errors, read-only
    `25006`, disk full, too many clients, a statement timeout: SQLSTATE classes 08, 53, 57, 58)
    raises `StoreUnavailable`, which pauses the consumer; a serialization failure or deadlock
    `RetryableError`; data the database cannot hold `PermanentError`; anything else
    `RetryableError`.
    """
    from psycopg_pool import PoolTimeout

    try:
        yield
    except (PoolTimeout, psycopg.InterfaceError) as exc:
        raise StoreUnavailable(f"database: {exc}") from exc
    except psycopg.errors.TransactionRollback as exc:  # serialization failure, deadlock
        raise RetryableError(f"database: {exc}") from exc
    except psycopg.Error as exc:
        state = exc.sqlstate
        if state is None and isinstance(exc, psycopg.OperationalError):
            raise StoreUnavailable(f"database: {exc}") from exc
        if state is not None and (state[:2] in _PG_OUTAGE_CLASSES or state == _PG_READ_ONLY):
            raise StoreUnavailable(f"database refuses writes or is away: {exc}") from exc
        if isinstance(exc, psycopg.DataError):
            raise PermanentError(f"the event does not fit the store: {exc}") from exc
        raise RetryableError(f"database: {exc}") from exc


@functools.lru_cache(maxsize=64)
def versioned_upsert(
    table: str, key: tuple[str, ...], columns: tuple[str, ...], version_column: str = "version"
) -> str:
    """An upsert that only overwrites an older version of the row, with a named placeholder per
    column: `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE stored.version < new.version`.
    Extend it (`... RETURNING` in a CTE: a row comes back only if the change was applied) or
    queue it in a pipeline. Rendered to text once."""
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


POSTGRES_PROBE_TABLE = "messaging_write_probe"
POSTGRES_PROBE_SQL = f"""
CREATE TABLE IF NOT EXISTS {POSTGRES_PROBE_TABLE} (name text PRIMARY KEY, at timestamptz NOT NULL)
"""


def postgres_write_probe(conn: psycopg.Connection, name: str = "consumer") -> None:
    """Prove the database takes writes (an upsert of one row of a table of the library's own,
    made here if missing); raises the driver's error if it does not."""
    with conn.transaction():
        conn.execute(POSTGRES_PROBE_SQL)
        conn.execute(
            f"INSERT INTO {POSTGRES_PROBE_TABLE} (name, at) VALUES (%s, now()) "
            "ON CONFLICT (name) DO UPDATE SET at = now()",
            (name,),
        )


# Error replies of a Redis that answers but cannot take writes now: none is the change's fault.
_REDIS_REFUSALS = ("OOM", "READONLY", "MISCONF", "NOREPLICAS", "MASTERDOWN", "LOADING", "BUSY")


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate redis-py's errors, inside this block, into the runtime's.

    A Redis that is away, loading, or answers but refuses writes (`OOM`, `READONLY`, `MISCONF`,
    `NOREPLICAS`, `MASTERDOWN`, `BUSY`) raises `StoreUnavailable`, which pauses the consumer;
    any other error `RetryableError`.
    """
    import redis

    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError) as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc
    except redis.exceptions.ResponseError as exc:
        refused = isinstance(
            exc, redis.exceptions.OutOfMemoryError | redis.exceptions.ReadOnlyError
        ) or (str(exc).split(" ", 1)[0].upper() in _REDIS_REFUSALS)
        if refused:
            raise StoreUnavailable(f"redis refuses writes: {exc}") from exc
        raise RetryableError(f"redis: {exc}") from exc
    except redis.RedisError as exc:
        raise RetryableError(f"redis: {exc}") from exc


def redis_write_probe(client: Any, key: str) -> None:
    """Prove Redis takes writes (an answering Redis may refuse them: out of memory, a read-only
    replica, a failed snapshot); raises the driver's error if it does not."""
    import time

    client.set(key, str(time.time()), ex=60)


# KEYS[1] the entity's hash. ARGV: version, the number of fields to set, then field/value pairs,
# then field/increment pairs. Applied only if newer than the version held; 1 if applied.
_VERSIONED_HASH = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local version = tonumber(ARGV[1])
if stored >= version then return 0 end
local sets = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'version', version)
for i = 3, 2 + sets * 2, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 3 + sets * 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


class RedisVersionGate:
    """A version-gated write of one entity's Redis hash: its `version` field and the model's
    own fields set, counters incremented, all in one atomic step, only if the version is newer.
    Duplicates, redeliveries, replays and reordering then converge."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._script = client.register_script(_VERSIONED_HASH)

    def apply(
        self,
        key: str,
        version: int,
        fields: Mapping[str, Any] | None = None,
        increments: Mapping[str, int] | None = None,
        pipe: Any = None,
    ) -> bool | None:
        """Apply if newer: True if applied (None when queued on `pipe`, a pipeline)."""
        fields, increments = fields or {}, increments or {}
        args: list[Any] = [version, len(fields)]
        for name, value in fields.items():
            args += [name, value]
        for name, by in increments.items():
            args += [name, by]
        with redis_errors():
            result = self._script(keys=[key], args=args, client=pipe)
        return None if pipe is not None else bool(result)
