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
_REDIS_REFUSALS = (
    "OOM", "READONLY", "MISCONF", "NOREPLICAS", "MASTERDOWN", "LOADING", "BUSY", "CLUSTERDOWN",
    "TRYAGAIN",
)  # fmt: skip
# What redis-py's cluster client says when it cannot find a cluster that serves every slot.
_CLUSTER_AWAY = ("Redis Cluster cannot be connected", "All slots are not covered", "startup_nodes")


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate redis-py's errors, inside this block, into the runtime's.

    A Redis that is away, loading, or answers but refuses writes (`OOM`, `READONLY`, `MISCONF`,
    `NOREPLICAS`, `MASTERDOWN`, `BUSY`), and a Redis Cluster that is down, failing over
    (`CLUSTERDOWN`, `TRYAGAIN`) or serves no node for a slot, raises `StoreUnavailable`, which
    pauses the consumer; any other error `RetryableError`.
    """
    import redis
    from redis.exceptions import ClusterError, RedisClusterException, SlotNotCoveredError

    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError) as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc
    except (ClusterError, redis.exceptions.TryAgainError, SlotNotCoveredError) as exc:
        raise StoreUnavailable(f"redis cluster: {exc}") from exc
    except RedisClusterException as exc:  # not a RedisError: the client's own complaints
        if str(exc).startswith(_CLUSTER_AWAY):
            raise StoreUnavailable(f"redis cluster: {exc}") from exc
        raise RetryableError(f"redis cluster: {exc}") from exc
    except redis.exceptions.ResponseError as exc:
        refused = isinstance(
            exc, redis.exceptions.OutOfMemoryError | redis.exceptions.ReadOnlyError
        ) or (str(exc).split(" ", 1)[0].upper() in _REDIS_REFUSALS)
        if refused:
            raise StoreUnavailable(f"redis refuses writes: {exc}") from exc
        raise RetryableError(f"redis: {exc}") from exc
    except redis.RedisError as exc:
        raise RetryableError(f"redis: {exc}") from exc


# -- one Redis or a Redis Cluster, from one URL ------------------------------------------------
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def redis_client(url: str, **options: Any) -> Any:
    """A redis-py client for a Redis URL: one server, or a Redis Cluster.

    - `redis://[[user]:password@]host[:port][/db]` (`rediss://` with TLS, `unix://`): one
      server, as `redis.Redis.from_url` reads it.
    - `redis+cluster://[[user]:password@]host:port[,host:port...]` (`rediss+cluster://` with
      TLS), or several `redis://` URLs separated by commas (as AMQP_URL lists brokers): a Redis
      Cluster, found through any of the nodes named (the client learns the others from them),
      with the first's credentials and options. A cluster has only database 0.

    A cluster's client is made on first use (redis-py asks the cluster for its slots when it
    makes one), so a process starts while the cluster is away, as it does with one server; until
    one answers, every call raises `redis.ConnectionError`. `options` go to the client.
    """
    import redis

    found = cluster_nodes(url)
    if found is None:
        return redis.Redis.from_url(url, **options)
    first, others = found

    def connect() -> Any:
        seeds = [redis.cluster.ClusterNode(host, port) for host, port in others]
        return redis.RedisCluster(url=first, startup_nodes=seeds, **options)

    return LazyRedisCluster(connect)


def cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]] | None:
    """A cluster URL's first node (as a `redis://` URL with its credentials and options) and
    the others' (host, port); None for a single server's URL. ValueError if it is neither."""
    from urllib.parse import urlsplit

    scheme, _, rest = url.strip().partition("://")
    base = CLUSTER_SCHEMES.get(scheme.lower())
    if base is None and "," not in url:
        return None
    if base is not None:
        credentials, at, where = rest.rpartition("@")
        cut = min((i for i in (where.find("/"), where.find("?")) if i >= 0), default=len(where))
        hosts, tail = where[:cut], where[cut:]
        nodes = [f"{base}://{credentials}{at}{host.strip()}{tail}" for host in hosts.split(",")]
    else:
        nodes = [part.strip() for part in url.split(",") if part.strip()]
    addresses = []
    for n, node in enumerate(nodes, 1):
        parts = urlsplit(node)
        # The URL itself is never repeated in a message: it may hold a password.
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"Redis Cluster URL: node {n} is not host:port")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"Redis Cluster URL: node {n} has no valid port") from None
        if parts.path.strip("/") not in ("", "0"):
            raise ValueError("Redis Cluster URL: a cluster has only database 0")
        addresses.append((parts.hostname, port))
    return nodes[0], addresses[1:]


class LazyRedisCluster:
    """A `redis.RedisCluster` made on first use, and again after a failed attempt; its methods
    are the cluster client's. `is_cluster` tells a store which way to SCAN and sum."""

    is_cluster = True

    def __init__(self, connect: Any) -> None:
        import threading

        from redis.connection import Encoder

        self._connect, self._client, self._lock = connect, None, threading.Lock()
        self._encoder = Encoder("utf-8", "strict", False)  # redis-py's default, for scripts

    def client(self) -> Any:
        """The cluster client, made now if it is not yet (redis.ConnectionError if no node
        answers)."""
        import redis

        if self._client is not None:
            return self._client
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._connect()
                except redis.exceptions.RedisClusterException as exc:
                    raise redis.ConnectionError(f"no Redis Cluster node answers: {exc}") from exc
            return self._client

    def register_script(self, script: str) -> Any:
        """A script object whose SHA is known without asking the cluster."""
        from redis.commands.core import Script

        return Script(self, script)

    def get_encoder(self) -> Any:
        return self._client.get_encoder() if self._client is not None else self._encoder

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client(), name)


def is_cluster(client: Any) -> bool:
    """The client talks to a Redis Cluster (redis_client's for a cluster URL, or redis-py's)."""
    import redis

    return bool(getattr(client, "is_cluster", False)) or isinstance(client, redis.RedisCluster)


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
