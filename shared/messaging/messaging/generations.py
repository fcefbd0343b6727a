"""Generation markers for self-healing read models, ready-made for Redis and PostgreSQL.

A read model that heals itself (healing.py) keeps one marker beside its data: its state
(`ready`, `rebuilding`, `wiping`), the replay request it waits for, when that was sent, and how
many replayed events the completion announced and the consumers settled. Each class here is a
`healing.GenerationStore`: every change is one atomic step of the store, so replicas of a
consumer that share it agree.
"""

from __future__ import annotations

from typing import Any

import psycopg

from .healing import READY, REBUILDING, WIPING, Generation
from .stores import postgres_errors, redis_errors

# KEYS[1] the marker hash. ARGV: request id. Only where there is no marker at all.
_REDIS_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'rebuilding', 'request', ARGV[1], 'since', 0,
           'expected', -1, 'settled', 0)
return 1
"""

# KEYS[1] the marker hash. ARGV: request id, time sent. Only while it is that request's rebuild:
# its time renewed and its count started again.
_REDIS_RENEW = """
if redis.call('HGET', KEYS[1], 'request') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'rebuilding' then return 0 end
redis.call('HSET', KEYS[1], 'since', ARGV[2], 'expected', -1, 'settled', 0)
return 1
"""

# KEYS[1] the marker hash. ARGV: request id, then 'expected' and the completion's event count,
# or 'settled' and a number of replayed events settled. Only while it is that request's
# rebuild; ready once as many were settled as the completion announced.
_REDIS_PROGRESS = """
if redis.call('HGET', KEYS[1], 'request') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'rebuilding' then return 0 end
if ARGV[2] == 'expected' then
  redis.call('HSET', KEYS[1], 'expected', ARGV[3])
else
  redis.call('HINCRBY', KEYS[1], 'settled', ARGV[3])
end
local expected = tonumber(redis.call('HGET', KEYS[1], 'expected') or '-1')
local settled = tonumber(redis.call('HGET', KEYS[1], 'settled') or '0')
if expected < 0 or settled < expected then return 0 end
redis.call('HSET', KEYS[1], 'state', 'ready')
return 1
"""

# KEYS[1] the marker hash. ARGV: request id, then 'renew' and the time, or 'abandon'. A wipe
# renews its marker while it is still its own; a stale one is removed by whoever takes over.
_REDIS_OWNED = """
if redis.call('HGET', KEYS[1], 'request') ~= ARGV[1] then return 0 end
if ARGV[2] == 'renew' then redis.call('HSET', KEYS[1], 'since', ARGV[3])
else redis.call('DEL', KEYS[1]) end
return 1
"""


class RedisGeneration:
    """The marker as one Redis hash (`key`): a store that lost its data loses it too."""

    def __init__(self, client: Any, key: str) -> None:
        self.client, self.key = client, key
        self._claim = client.register_script(_REDIS_CLAIM)
        self._progress = client.register_script(_REDIS_PROGRESS)
        self._owned = client.register_script(_REDIS_OWNED)
        self._renew = client.register_script(_REDIS_RENEW)

    def generation(self) -> Generation | None:
        with redis_errors():
            raw = self.client.hgetall(self.key)
        if not raw:
            return None
        values = {_text(k): _text(v) for k, v in raw.items()}
        try:
            since = float(values.get("since", "0"))
        except ValueError:
            since = 0.0
        return Generation(values.get("state", REBUILDING), values.get("request", ""), since)

    def claim_rebuild(self, request_id: str) -> bool:
        with redis_errors():
            return bool(self._claim(keys=[self.key], args=[request_id]))

    def begin_rebuild(self, request_id: str, since: float) -> None:
        with redis_errors():
            self.client.hset(
                self.key,
                mapping={
                    "state": REBUILDING,
                    "request": request_id,
                    "since": since,
                    "expected": -1,
                    "settled": 0,
                },
            )

    def renew_rebuild(self, request_id: str, since: float) -> bool:
        with redis_errors():
            return bool(self._renew(keys=[self.key], args=[request_id, since]))

    def finish_rebuild(self, request_id: str, events: int) -> bool:
        with redis_errors():
            return bool(self._progress(keys=[self.key], args=[request_id, "expected", events]))

    def count_replayed(self, request_id: str, settled: int) -> bool:
        with redis_errors():
            return bool(self._progress(keys=[self.key], args=[request_id, "settled", settled]))

    def abandon(self, request_id: str) -> bool:
        with redis_errors():
            return bool(self._owned(keys=[self.key], args=[request_id, "abandon"]))

    # -- an operator's wipe ------------------------------------------------------------------
    def begin_wipe(self, wipe_id: str, now: float) -> None:
        self.client.hset(self.key, mapping={"state": WIPING, "request": wipe_id, "since": now})

    def renew_wipe(self, wipe_id: str, now: float) -> bool:
        """Still this wipe's marker: True (and its time renewed); taken over: False."""
        return bool(self._owned(keys=[self.key], args=[wipe_id, "renew", now]))

    def mark_ready(self) -> None:
        """A fresh store that needs no replay (tests, a new model): ready at once."""
        self.client.hset(self.key, mapping={"state": READY, "request": "", "since": 0})


POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS messaging_generation (
    name      text        PRIMARY KEY,
    state     text        NOT NULL,
    request   text        NOT NULL,
    since     double precision NOT NULL DEFAULT 0,
    expected  bigint      NOT NULL DEFAULT -1,
    settled   bigint      NOT NULL DEFAULT 0
)
"""


class PostgresGeneration:
    """The marker as one row of `messaging_generation` (`name`: the model's), in the model's own
    database: a database restored without it, or a new one, has none."""

    def __init__(self, pool: Any, name: str) -> None:
        self.pool, self.name = pool, name

    def install(self) -> None:
        """Create the table if it is missing (a model's migrations may call it)."""
        with self.pool.connection() as conn:
            conn.execute(POSTGRES_SCHEMA)

    def _one(self, sql: str, params: dict[str, Any]) -> Any:
        with postgres_errors(), self.pool.connection() as conn:
            conn.autocommit = True
            try:
                return conn.execute(sql, {"name": self.name, **params}).fetchone()
            except psycopg.errors.UndefinedTable:
                conn.execute(POSTGRES_SCHEMA)
                return conn.execute(sql, {"name": self.name, **params}).fetchone()
            finally:
                conn.autocommit = False

    def generation(self) -> Generation | None:
        row = self._one(
            "SELECT state, request, since FROM messaging_generation WHERE name = %(name)s", {}
        )
        return Generation(row[0], row[1], float(row[2])) if row else None

    def claim_rebuild(self, request_id: str) -> bool:
        row = self._one(
            "INSERT INTO messaging_generation (name, state, request) "
            "VALUES (%(name)s, 'rebuilding', %(request)s) ON CONFLICT DO NOTHING RETURNING 1",
            {"request": request_id},
        )
        return row is not None

    def begin_rebuild(self, request_id: str, since: float) -> None:
        self._one(
            "INSERT INTO messaging_generation (name, state, request, since) "
            "VALUES (%(name)s, 'rebuilding', %(request)s, %(since)s) ON CONFLICT (name) DO "
            "UPDATE SET state = 'rebuilding', request = EXCLUDED.request, since = EXCLUDED.since,"
            " expected = -1, settled = 0 RETURNING 1",
            {"request": request_id, "since": since},
        )

    def renew_rebuild(self, request_id: str, since: float) -> bool:
        row = self._one(
            "UPDATE messaging_generation SET since = %(since)s, expected = -1, settled = 0 "
            "WHERE name = %(name)s AND request = %(request)s AND state = 'rebuilding' RETURNING 1",
            {"request": request_id, "since": since},
        )
        return row is not None

    def finish_rebuild(self, request_id: str, events: int) -> bool:
        return self._progress(request_id, "expected = %(n)s", events)

    def count_replayed(self, request_id: str, settled: int) -> bool:
        return self._progress(request_id, "settled = settled + %(n)s", settled)

    def _progress(self, request_id: str, change: str, n: int) -> bool:
        row = self._one(
            f"UPDATE messaging_generation SET {change} "
            "WHERE name = %(name)s AND request = %(request)s AND state = 'rebuilding' "
            "RETURNING expected, settled",
            {"request": request_id, "n": n},
        )
        if row is None or row[0] < 0 or row[1] < row[0]:
            return False
        done = self._one(
            "UPDATE messaging_generation SET state = 'ready' "
            "WHERE name = %(name)s AND request = %(request)s AND state = 'rebuilding' "
            "AND expected >= 0 AND settled >= expected RETURNING 1",
            {"request": request_id},
        )
        return done is not None

    def abandon(self, request_id: str) -> bool:
        row = self._one(
            "DELETE FROM messaging_generation WHERE name = %(name)s AND request = %(request)s "
            "RETURNING 1",
            {"request": request_id},
        )
        return row is not None

    def mark_ready(self) -> None:
        self._one(
            "INSERT INTO messaging_generation (name, state, request) VALUES "
            "(%(name)s, 'ready', '') ON CONFLICT (name) DO UPDATE SET state = 'ready' RETURNING 1",
            {},
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
