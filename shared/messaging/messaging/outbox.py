"""Outbox write side: record an event in the caller's own transaction.

The producer's change and its event commit or roll back together, so a rolled-back write is
never published and a committed one is never lost. The relay (relay.py) publishes the rows.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
from servicekit import tracing

from .digests import BUCKET_SQL, CONTRIBUTION_SQL, MODULUS, Digests
from .envelope import Envelope

NOTIFY_CHANNEL = "messaging_outbox"

# Idempotent DDL: applied by the producer's migrations through install().
SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS messaging_entity_versions (
    entity      text   NOT NULL,
    entity_id   text   NOT NULL,
    version     bigint NOT NULL,
    PRIMARY KEY (entity, entity_id)
);
CREATE TABLE IF NOT EXISTS messaging_outbox (
    id              bigserial   PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    event_type      text        NOT NULL,
    entity          text        NOT NULL,
    entity_id       text        NOT NULL,
    entity_version  bigint      NOT NULL,
    occurred_at     timestamptz NOT NULL,
    correlation_id  text,
    body            text        NOT NULL,
    published_at    timestamptz,
    UNIQUE (entity, entity_id, entity_version)
);
-- The trace context of the request that wrote the row (tracing.py), when tracing is on.
ALTER TABLE messaging_outbox ADD COLUMN IF NOT EXISTS trace_context text;
CREATE INDEX IF NOT EXISTS messaging_outbox_unpublished
    ON messaging_outbox (id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS messaging_outbox_occurred_at ON messaging_outbox (occurred_at);
-- The oldest unpublished event and the last publish, for /metrics and `messaging outbox status`.
CREATE INDEX IF NOT EXISTS messaging_outbox_published_at
    ON messaging_outbox (published_at) WHERE published_at IS NOT NULL;
CREATE OR REPLACE FUNCTION messaging_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- One notification per statement, carrying its lowest id: the relay uses it to pick up a
    -- transaction that committed after rows with higher ids were already published.
    PERFORM pg_notify('{NOTIFY_CHANNEL}', (SELECT min(id) FROM new_rows)::text);
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER messaging_outbox_notify
    AFTER INSERT ON messaging_outbox REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION messaging_outbox_notify();
-- A row the broker cannot take (relay.py) is parked with its reason instead of holding back the
-- rows behind it: the outbox's own dead letter, listed and sent again by `messaging outbox`.
ALTER TABLE messaging_outbox ADD COLUMN IF NOT EXISTS parked_at timestamptz;
ALTER TABLE messaging_outbox ADD COLUMN IF NOT EXISTS parked_reason text;
CREATE INDEX IF NOT EXISTS messaging_outbox_parked
    ON messaging_outbox (id) WHERE parked_at IS NOT NULL;
-- The newest published version of every entity and, per entity type and bucket, the digest of
-- those versions (digests.py): the relay keeps both as it marks rows published, and read models
-- are verified against them. Compaction never touches them.
CREATE TABLE IF NOT EXISTS messaging_published (
    entity        text    NOT NULL,
    entity_id     text    NOT NULL,
    version       bigint  NOT NULL,
    bucket        integer NOT NULL,
    contribution  bigint  NOT NULL,
    PRIMARY KEY (entity, entity_id)
);
CREATE INDEX IF NOT EXISTS messaging_published_bucket ON messaging_published (entity, bucket);
-- A deleted entity keeps its row (a verification's repair replays its deletion) but counts
-- nothing in its bucket's digest, so read models may forget their tombstones (digests.py).
ALTER TABLE messaging_published ADD COLUMN IF NOT EXISTS deleted boolean NOT NULL DEFAULT false;
CREATE TABLE IF NOT EXISTS messaging_digests (
    entity    text    NOT NULL,
    bucket    integer NOT NULL,
    digest    bigint  NOT NULL,
    entities  bigint  NOT NULL,
    PRIMARY KEY (entity, bucket)
);
-- What the relay has published, for /metrics (the outbox itself is compacted).
CREATE TABLE IF NOT EXISTS messaging_relay_stats (
    name               text        PRIMARY KEY,
    published          bigint      NOT NULL DEFAULT 0,
    last_published_at  timestamptz
);
"""

_INSTALL_LOCK = 0x6D736700  # arbitrary advisory lock id: serialises concurrent installs


# An event that deletes its entity, in SQL (Envelope: the change after the entity's dot).
DELETION_SQL = "({event_type} = {entity} || '.deleted')"
_DELETION = DELETION_SQL.format(event_type="event_type", entity="entity")

# An outbox that published rows before it kept digests: the newest published version of every
# entity, and its buckets' digests, once (install finds the tables empty).
_BACKFILL_SQL = f"""
INSERT INTO messaging_published (entity, entity_id, version, bucket, contribution, deleted)
SELECT entity, entity_id, entity_version,
       {BUCKET_SQL.format(entity="entity", entity_id="entity_id")},
       {CONTRIBUTION_SQL.format(entity="entity", entity_id="entity_id", version="entity_version")},
       {_DELETION}
FROM (
    SELECT DISTINCT ON (entity, entity_id) entity, entity_id, entity_version, event_type
    FROM messaging_outbox WHERE published_at IS NOT NULL
    ORDER BY entity, entity_id, entity_version DESC
) latest
WHERE NOT EXISTS (SELECT 1 FROM messaging_published);
INSERT INTO messaging_digests (entity, bucket, digest, entities)
SELECT entity, bucket, coalesce(sum(contribution) FILTER (WHERE NOT deleted), 0) % {MODULUS},
       count(*) FILTER (WHERE NOT deleted)
FROM messaging_published
WHERE NOT EXISTS (SELECT 1 FROM messaging_digests)
GROUP BY entity, bucket;
"""

# Digests kept before deletions stopped counting (or by a relay of that version, marking after
# the upgrade): each published row's `deleted` set from its event, and the buckets of the rows
# it changed summed again from their rows.
_ITS_DELETION = DELETION_SQL.format(event_type="o.event_type", entity="o.entity")
_FLAG_DELETIONS_SQL = f"""
WITH flagged AS (
    UPDATE messaging_published p SET deleted = {_ITS_DELETION}
    FROM messaging_outbox o
    WHERE o.entity = p.entity AND o.entity_id = p.entity_id AND o.entity_version = p.version
      AND p.deleted IS DISTINCT FROM {_ITS_DELETION}
    RETURNING p.entity, p.bucket
)
SELECT DISTINCT entity, bucket FROM flagged
"""
_RECOUNT_SQL = f"""
INSERT INTO messaging_digests AS d (entity, bucket, digest, entities)
SELECT w.entity, w.bucket,
       coalesce(sum(p.contribution) FILTER (WHERE NOT p.deleted), 0) %% {MODULUS},
       count(p.entity) FILTER (WHERE NOT p.deleted)
FROM unnest(%s::text[], %s::int[]) AS w (entity, bucket)
LEFT JOIN messaging_published p ON p.entity = w.entity AND p.bucket = w.bucket
GROUP BY w.entity, w.bucket
ON CONFLICT (entity, bucket) DO UPDATE SET digest = EXCLUDED.digest, entities = EXCLUDED.entities
"""
# Advisory (transaction) lock of whatever changes the digests: the relay's marks (an old leader's
# marker may overlap the new one's) and install's recount.
MARK_LOCK = 0x6D737202


def install(conn: psycopg.Connection) -> None:
    """Create the outbox tables, index and trigger if they are missing, bring the digests up to
    date (a backfill, deletions uncounted), then commit. Reads every published row: a migration
    step, not something to run at each start."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_INSTALL_LOCK,))
        cur.execute(SCHEMA_SQL)
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MARK_LOCK,))
        cur.execute(_BACKFILL_SQL)
        touched = cur.execute(_FLAG_DELETIONS_SQL).fetchall()
        if touched:
            entities, buckets = zip(*touched, strict=True)
            cur.execute(_RECOUNT_SQL, (list(entities), list(buckets)))


def next_version(cur: psycopg.Cursor, entity: str, entity_id: str) -> int:
    """Allocate the entity's next version inside the caller's transaction.

    The upsert takes the counter row's lock until commit, so concurrent writers of one entity
    queue up: no duplicates, and a rollback gives the number back, so no gaps. The row is kept
    after a deletion, so a re-created entity continues past its tombstone's version.
    """
    # The caller's connection and transaction, but a plain cursor: theirs may return dicts.
    row = cur.connection.execute(
        """
        INSERT INTO messaging_entity_versions (entity, entity_id, version) VALUES (%s, %s, 1)
        ON CONFLICT (entity, entity_id)
        DO UPDATE SET version = messaging_entity_versions.version + 1
        RETURNING version
        """,
        (entity, entity_id),
    ).fetchone()
    assert row is not None
    return int(row[0])


class Outbox:
    """Adds events for one producer to the outbox, through the caller's cursor."""

    def __init__(self, producer: str) -> None:
        self.producer = producer

    def add(
        self,
        cur: psycopg.Cursor,
        *,
        event_type: str,
        entity_id: str,
        data: dict[str, Any] | None,
        correlation_id: str | None = None,
    ) -> Envelope:
        """Record one event of an entity; it is published only if the transaction commits."""
        entity = str(event_type).partition(".")[0]
        envelope = Envelope.new(
            event_type=event_type,
            entity_id=str(entity_id),
            entity_version=next_version(cur, entity, str(entity_id)),
            data=data,
            producer=self.producer,
            correlation_id=correlation_id,
        )
        cur.execute(
            """
            INSERT INTO messaging_outbox (event_id, event_type, entity, entity_id, entity_version,
                                          occurred_at, correlation_id, body, trace_context)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            (
                envelope.event_id,
                envelope.event_type,
                envelope.entity,
                envelope.entity_id,
                envelope.entity_version,
                envelope.occurred_at,
                envelope.correlation_id,
                envelope.to_json().decode(),
                tracing.captured(),
            ),
        )
        return envelope

    def add_many(
        self,
        cur: psycopg.Cursor,
        *,
        event_type: str,
        data: dict[str, dict[str, Any] | None],
        correlation_id: str | None = None,
    ) -> list[Envelope]:
        """`add` for many entities of one type at once (bulk writes): same versions, same rows,
        one statement each, so the relay is notified once. `data` maps entity id to its state."""
        ids = sorted(data)
        if not ids:
            return []
        versions = _next_versions(cur, str(event_type).partition(".")[0], ids)
        envelopes = [
            Envelope.new(
                event_type=event_type,
                entity_id=entity_id,
                entity_version=versions[entity_id],
                data=data[entity_id],
                producer=self.producer,
                correlation_id=correlation_id,
            )
            for entity_id in ids
        ]
        cur.execute(
            """
            INSERT INTO messaging_outbox (event_id, event_type, entity, entity_id, entity_version,
                                          occurred_at, correlation_id, body, trace_context)
            SELECT *, %b::text FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::text[],
                                           %b::bigint[], %b::timestamptz[], %b::text[], %b::text[])
            """,
            [
                tracing.captured(),
                [e.event_id for e in envelopes],
                [e.event_type for e in envelopes],
                [e.entity for e in envelopes],
                [e.entity_id for e in envelopes],
                [e.entity_version for e in envelopes],
                [e.occurred_at for e in envelopes],
                [e.correlation_id for e in envelopes],
                [e.to_json().decode() for e in envelopes],
            ],
        )
        return envelopes


def _next_versions(cur: psycopg.Cursor, entity: str, entity_ids: list[str]) -> dict[str, int]:
    """next_version for many entities in one statement (locks taken in id order)."""
    rows = cur.connection.execute(
        """
        INSERT INTO messaging_entity_versions (entity, entity_id, version)
        SELECT %s, id, 1 FROM unnest(%b::text[]) AS id ORDER BY id
        ON CONFLICT (entity, entity_id)
        DO UPDATE SET version = messaging_entity_versions.version + 1
        RETURNING entity_id, version
        """,
        (entity, entity_ids),
    ).fetchall()
    return {entity_id: int(version) for entity_id, version in rows}


def backlog(conn: psycopg.Connection) -> tuple[int, float]:
    """Events waiting to be published and the age in seconds of the oldest one (0 when there is
    none); parked rows are not waiting (see `parked`)."""
    row = conn.execute(
        "SELECT count(*), coalesce(extract(epoch FROM now() - min(occurred_at)), 0) "
        "FROM messaging_outbox WHERE published_at IS NULL AND parked_at IS NULL"
    ).fetchone()
    return int(row[0]), float(row[1])


def parked_count(conn: psycopg.Connection) -> int:
    """How many rows the relay parked (for /metrics)."""
    return int(conn.execute(PARKED_COUNT_SQL).fetchone()[0])


PARKED_COUNT_SQL = "SELECT count(*) FROM messaging_outbox WHERE parked_at IS NOT NULL"


def parked(conn: psycopg.Connection, limit: int = 100) -> list[dict[str, Any]]:
    """The rows the relay parked, oldest first, each with its reason and the newest version of
    its entity published since (`superseded_by`, None if none): the consumers already hold that
    newer state, and their version gate skips the parked one if it is sent again."""
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """
            SELECT o.id, o.event_id::text, o.event_type, o.entity, o.entity_id,
                   o.entity_version, o.occurred_at, o.parked_at, o.parked_reason,
                   (SELECT max(n.entity_version) FROM messaging_outbox n
                    WHERE n.entity = o.entity AND n.entity_id = o.entity_id
                      AND n.entity_version > o.entity_version
                      AND n.published_at IS NOT NULL) AS superseded_by
            FROM messaging_outbox o WHERE o.parked_at IS NOT NULL ORDER BY o.id LIMIT %s
            """,
            (limit,),
        )
        return cur.fetchall()


def unpark(conn: psycopg.Connection, ids: list[int] | None) -> int:
    """Give parked rows back to the relay (all of them for None), after a fix; how many.

    The relay publishes them at its next look (it is woken at once)."""
    with conn.transaction():
        rows = conn.execute(
            "UPDATE messaging_outbox SET parked_at = NULL, parked_reason = NULL "
            "WHERE parked_at IS NOT NULL AND (%(all)s OR id = ANY(%(ids)s)) RETURNING id",
            {"all": ids is None, "ids": ids or []},
        ).fetchall()
        if rows:
            conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(min(r[0] for r in rows))))
    return len(rows)


def published(conn: psycopg.Connection) -> tuple[int, float | None]:
    """Events the relay has published (its mark statement counts them), and when it last did
    (epoch seconds)."""
    row = conn.execute(
        "SELECT published, extract(epoch FROM last_published_at) "
        "FROM messaging_relay_stats WHERE name = 'relay'"
    ).fetchone()
    return (int(row[0]), float(row[1]) if row[1] is not None else None) if row else (0, None)


class OutboxBusy(RuntimeError):
    """The outbox was never free of open writes long enough to take a position."""


def position(conn: psycopg.Connection, wait: float = 5.0) -> int:
    """The outbox's position now: every event committed from now on has a higher id.

    An id is taken when a row is written, so a transaction still open may commit a lower id
    after higher ones are visible; the highest visible id is a position only while no such
    transaction is open. So it is read under a SHARE lock, which waits for none: taken with
    NOWAIT while the writes allow it (writers are never held up), for up to `wait` seconds, then
    once waiting at most a second (writers wait that long at most). OutboxBusy if neither works.
    The connection must not be in a transaction (the lock would outlast the reading).
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("outbox.position needs a connection outside a transaction")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            return _position(conn, nowait=True)
        except psycopg.errors.LockNotAvailable:
            time.sleep(0.02)  # the open writes are short: look again soon
    try:
        return _position(conn, nowait=False)
    except psycopg.errors.LockNotAvailable:
        raise OutboxBusy("writes to the outbox never paused for it: try again") from None


def _position(conn: psycopg.Connection, nowait: bool) -> int:
    with conn.transaction():
        if nowait:
            conn.execute("LOCK TABLE messaging_outbox IN SHARE MODE NOWAIT")
        else:
            conn.execute("SET LOCAL lock_timeout = '1s'")
            conn.execute("LOCK TABLE messaging_outbox IN SHARE MODE")
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM messaging_outbox").fetchone()[0])


HISTORY_COLUMNS = (
    "id, event_id::text, event_type, entity, entity_id, entity_version, occurred_at, "
    "published_at, correlation_id"
)


def history(
    conn: psycopg.Connection,
    *,
    entity_ids: list[str] | None = None,
    correlation_id: str | None = None,
    data_field: tuple[str, str] | None = None,
    limit: int = 500,
) -> list[dict[str, Any]]:
    """The events still in the outbox (the latest of every entity, and every one younger than
    the retention) about these entities, with this correlation id, or whose data has this
    field equal to this value (a parent's children by its id), oldest first."""
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {HISTORY_COLUMNS} FROM messaging_outbox "
            "WHERE entity_id = ANY(%(ids)s) OR correlation_id = %(cid)s "
            "OR (%(field)s::text IS NOT NULL AND body::jsonb -> 'data' ->> %(field)s = %(value)s) "
            "ORDER BY id LIMIT %(limit)s",
            {
                "ids": entity_ids or [],
                "cid": correlation_id,
                "field": data_field[0] if data_field else None,
                "value": data_field[1] if data_field else None,
                "limit": limit,
            },
        )
        return cur.fetchall()


def digests(conn: psycopg.Connection, entities: list[str] | None = None) -> Digests:
    """The digests of what was published (digests.py), per entity type and bucket: all types,
    or these. Read from the digests the relay keeps, never from the outbox. A bucket whose
    entities are all deleted counts nothing: left out, as a model's empty bucket is."""
    found: Digests = {}
    rows = conn.execute(
        "SELECT entity, bucket, digest, entities FROM messaging_digests "
        "WHERE (%(all)s OR entity = ANY(%(entities)s)) AND (digest <> 0 OR entities <> 0)",
        {"all": entities is None, "entities": entities or []},
    ).fetchall()
    for entity, where, digest, count in rows:
        found.setdefault(entity, {})[where] = (int(digest), int(count))
    return found


def published_versions(conn: psycopg.Connection, entity: str, buckets: list[int]) -> dict[str, int]:
    """entity id -> its newest published version, for the entities of these buckets that the
    digests count (not deleted)."""
    rows = conn.execute(
        "SELECT entity_id, version FROM messaging_published "
        "WHERE entity = %s AND bucket = ANY(%s) AND NOT deleted",
        (entity, buckets),
    ).fetchall()
    return {entity_id: int(version) for entity_id, version in rows}
