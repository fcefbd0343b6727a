"""Digests of what a producer published and what a read model holds, per bucket of entities.

Anti-entropy, as Dynamo and Cassandra repair replicas: each side sums, per entity type and per
bucket of entities, a 52-bit hash of every live entity's `(type, id, version)`. Two sides that
hold the same versions have the same sums; a bucket that differs names the few thousandths of
the entities a repair must replay.

A deleted entity counts nothing, on either side: a read model may forget its tombstone (the
version marker that keeps a late event from bringing the entity back) without its digests
moving, and one that still holds the entity alive, having missed the deletion or taken a late
older event after forgetting, differs from the producer, whose repair replays the deletion.

- bucket:        the first 32 bits of SHA-256 of `"<entity>:<entity_id>"`, modulo 1024;
- contribution:  the first 52 bits of SHA-256 of `"<entity>:<entity_id>:<version>"`;
- digest:        the sum of the contributions in the bucket, modulo 2**52 (so one entity's
                 change updates it in O(1): minus its old contribution, plus its new one).

The same functions exist in SQL (`BUCKET_SQL`, `CONTRIBUTION_SQL`), so the producer keeps its
digests in the statement that marks rows published, and Python (`bucket`, `contribution`), so a
read model keeps each entity's contribution beside it in the same write as the entity.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

BUCKETS = 1024
MODULUS = 2**52

# A read model's or the producer's digests: entity type -> bucket -> (digest, entities).
Digests = dict[str, dict[int, tuple[int, int]]]


def bucket(entity: str, entity_id: str) -> int:
    """The bucket of an entity, 0 to 1023."""
    head = hashlib.sha256(f"{entity}:{entity_id}".encode()).digest()[:4]
    return int.from_bytes(head, "big") % BUCKETS


def contribution(entity: str, entity_id: str, version: int) -> int:
    """What an entity at a version adds to its bucket's digest (52 bits)."""
    head = hashlib.sha256(f"{entity}:{entity_id}:{version}".encode()).hexdigest()[:13]
    return int(head, 16)


def summed(rows: Iterable[tuple[str, int, int]]) -> Digests:
    """Digests from (entity, bucket, contribution) rows: a read model's, computed from what it
    holds."""
    found: Digests = {}
    for entity, where, part in rows:
        digest, count = found.setdefault(entity, {}).get(where, (0, 0))
        found[entity][where] = ((digest + part) % MODULUS, count + 1)
    return found


def merge(into: Digests, part: Digests) -> Digests:
    """Add `part` (digests of other entities) into `into`; returns `into`."""
    for entity, found in part.items():
        buckets = into.setdefault(entity, {})
        for where, (digest, count) in found.items():
            had, n = buckets.get(where, (0, 0))
            buckets[where] = ((had + digest) % MODULUS, n + count)
    return into


def differing(producer: Digests, model: Digests, entities: Iterable[str]) -> dict[str, list[int]]:
    """The buckets of each entity type whose digests differ (a bucket one side lacks counts as
    empty there)."""
    out: dict[str, list[int]] = {}
    for entity in entities:
        ours: Mapping[int, tuple[int, int]] = producer.get(entity, {})
        theirs: Mapping[int, tuple[int, int]] = model.get(entity, {})
        wrong = sorted(
            b for b in set(ours) | set(theirs) if ours.get(b, (0, 0)) != theirs.get(b, (0, 0))
        )
        if wrong:
            out[entity] = wrong
    return out


def encode(digests: Digests) -> dict[str, list[list[int]]]:
    """Digests as JSON: entity -> [[bucket, digest, entities], ...]."""
    return {
        entity: [[b, d, n] for b, (d, n) in sorted(buckets.items())]
        for entity, buckets in digests.items()
    }


def decode(raw: object) -> Digests:
    """Digests from their JSON (ValueError for anything else)."""
    if not isinstance(raw, dict):
        raise ValueError("digests are not an object")
    out: Digests = {}
    for entity, rows in raw.items():
        if not isinstance(entity, str) or not isinstance(rows, list):
            raise ValueError("digests are not entity -> rows")
        buckets = out.setdefault(entity, {})
        for row in rows:
            if not (isinstance(row, list) and len(row) == 3 and all(_count(v) for v in row)):
                raise ValueError("a digest row is not [bucket, digest, entities]")
            if not 0 <= row[0] < BUCKETS or row[1] >= MODULUS:
                raise ValueError("a digest row is out of range")
            buckets[row[0]] = (row[1], row[2])
    return out


def answer(found: Digests, request_ids: list[str], reply_to: list[str]) -> bytes:
    """The body of the producer's answer to verification requests (replay.DIGESTS_TYPE)."""
    return json.dumps(
        {"request_ids": request_ids, "reply_to": reply_to, "digests": encode(found)}
    ).encode()


def of_versions(versions: Iterable[tuple[str, str, int]]) -> Digests:
    """Digests of (entity, entity id, version) triples, those of the live entities: what a
    producer's are, computed (leave its deleted entities out)."""
    return summed(
        (entity, bucket(entity, entity_id), contribution(entity, entity_id, version))
        for entity, entity_id, version in versions
    )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The same in SQL, for the producer's statements (PostgreSQL 11 and later: sha256 is built in).
# Formatted with column names; in a statement with parameters, double the `%` (sql_with_params).
BUCKET_SQL = (
    "(('x' || substr(encode(sha256(convert_to({entity} || ':' || {entity_id}, 'UTF8')), 'hex'),"
    " 1, 8))::bit(32)::bigint % 1024)"
)
CONTRIBUTION_SQL = (
    "(('x' || substr(encode(sha256(convert_to({entity} || ':' || {entity_id} || ':' || "
    "{version}::text, 'UTF8')), 'hex'), 1, 13))::bit(52)::bigint)"
)


def sql_with_params(snippet: str) -> str:
    """A snippet for a statement that also has parameters (psycopg reads `%` as a placeholder)."""
    return snippet.replace("%", "%%")
