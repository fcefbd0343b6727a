"""All Redis access of the score service: version-gated Lua scripts and the score read.

Key layout (prefix `SCORE_KEY_PREFIX`, default `score:`):

- `score:person:<cpf>`        hash: `version` (person entity_version), `deleted` (0/1),
                              `rev` (bumped by every applied change of the person or its items),
                              `at` (a tombstone's: when the deletion was applied, epoch seconds)
- `score:item:<id>`           hash: `version`, `deleted`, `cpf`, `kind`, `value` (decimal string),
                              `at` (as the person's)
- `score:tombstones`          sorted set of the tombstones' keys, by `at`: what the retention
                              prunes (TOMBSTONE_RETENTION_DAYS), found without a SCAN
- `score:tombstones-indexed`  set once every tombstone is in that index (tombstones written
                              before it existed are added by the first pruning)
- `score:person-items:<cpf>`  set of the ids of the person's live items
- `score:generation`          hash: `state` (ready/rebuilding/wiping), `request`, `since`,
                              `expected` and `settled` (replayed events the completion announced
                              and the consumers counted): the marker a store that lost its data
                              is missing (healing.py)
- `score:probe`               the consumer's write probe: written while a pause waits
- `score:consumer:<replica>`  what one consumer replica last reported (JSON: `health`,
                              `stats`), expiring unless beaten again
- `score:consumers`           sorted set of the replicas that beat, by last beat (epoch seconds):
                              the index of the keys above, without a SCAN

Each change is one script that compares `entity_version` with the stored one and applies only a
newer one, atomically, so duplicates, reordering and replays converge. Deletions leave tombstones
(the hash with `deleted` 1 and its version), so a late event cannot bring an entity back; they
count nothing in the digests and are pruned after TOMBSTONE_RETENTION_DAYS (docs/guarantees.md
says why that is safe). An
item event the gate skips still repairs the item's membership in its person's set, so a wipe
that removed the set but not the item (the wipe runs in passes, under live traffic) is mended by
the replay that follows it. The scripts derive some keys from the prefix: this layout is for a
standalone Redis, not a cluster.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis
from messaging import digests as sums
from messaging.generations import RedisGeneration
from messaging.healing import Generation
from messaging.stores import redis_errors, redis_write_probe

from .scoring import KINDS, score

GENERATION_KEY = "generation"
TOMBSTONES_KEY = "tombstones"  # the tombstones' index: key -> when the deletion was applied
TOMBSTONES_INDEXED_KEY = "tombstones-indexed"
VERIFICATION_KEY = "verification"  # the last check's divergent buckets (verification.py)
BEACON_KEY = "consumer:"  # + replica id
BEACONS_KEY = "consumers"
BEACON_FORGET_SECONDS = 3600.0  # a replica that has not beaten for this long leaves the index

# A tombstone's bookkeeping, in both apply scripts: KEYS[1] the entity's hash, KEYS[2] the
# tombstones' index; `deleted` '1' or '0', `now` epoch seconds.
_TOMBSTONE_LUA = """
local function tombstone(deleted, now)
  if deleted == '1' then
    redis.call('HSET', KEYS[1], 'at', now)
    redis.call('ZADD', KEYS[2], now, KEYS[1])
  else
    redis.call('HDEL', KEYS[1], 'at')
    redis.call('ZREM', KEYS[2], KEYS[1])
  end
end
"""

# KEYS[1] person hash, KEYS[2] tombstones' index. ARGV: version, deleted, contribution, bucket
# (messaging.digests: kept beside the version, so verification sums what the model holds), now.
# A deletion does not cascade to the items: the producer emits each item's own deletion first,
# and under reordering a cascade could remove an item that belongs to the person's next life.
_APPLY_PERSON = (
    _TOMBSTONE_LUA
    + """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local version = tonumber(ARGV[1])
if stored >= version then return 0 end
redis.call('HSET', KEYS[1], 'version', version, 'deleted', ARGV[2], 'entity', 'person',
           'h', ARGV[3], 'b', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'rev', 1)
tombstone(ARGV[2], ARGV[5])
return 1
"""
)

# KEYS[1] item hash, KEYS[2] tombstones' index. ARGV: version, deleted, item id, cpf ('' on a
# deletion), kind, value, key prefix, entity (its kind, on a deletion too), contribution, bucket,
# now.
_APPLY_ITEM = (
    _TOMBSTONE_LUA
    + """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local version = tonumber(ARGV[1])
local prefix = ARGV[7]
if stored >= version then
  local held = redis.call('HMGET', KEYS[1], 'deleted', 'cpf')
  if held[2] and held[2] ~= '' then
    local set = prefix .. 'person-items:' .. held[2]
    if held[1] == '0' then redis.call('SADD', set, ARGV[3])
    else redis.call('SREM', set, ARGV[3]) end
  end
  return 0
end
local cpf = ARGV[4]
if cpf == '' then cpf = redis.call('HGET', KEYS[1], 'cpf') or '' end
redis.call('HSET', KEYS[1], 'entity', ARGV[8], 'h', ARGV[9], 'b', ARGV[10])
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'version', version, 'deleted', '1')
  if cpf ~= '' then redis.call('SREM', prefix .. 'person-items:' .. cpf, ARGV[3]) end
else
  redis.call('HSET', KEYS[1], 'version', version, 'deleted', '0', 'cpf', cpf,
             'kind', ARGV[5], 'value', ARGV[6])
  redis.call('SADD', prefix .. 'person-items:' .. cpf, ARGV[3])
end
if cpf ~= '' then redis.call('HINCRBY', prefix .. 'person:' .. cpf, 'rev', 1) end
tombstone(ARGV[2], ARGV[11])
return 1
"""
)

# KEYS[1] tombstones' index. ARGV: the cutoff (epoch seconds), then the keys to prune. A key is
# deleted only if it still is a tombstone applied before the cutoff (re-created since: it only
# leaves the index; deleted again since: it stays, at its new time). Another type or fields
# written by hand: it leaves the index, untouched. Returns how many were deleted.
_PRUNE_TOMBSTONES = """
local cutoff, pruned = tonumber(ARGV[1]), 0
for i = 2, #ARGV do
  local key = ARGV[i]
  local held = redis.pcall('HMGET', key, 'deleted', 'at')
  local at = type(held) == 'table' and not held.err and tonumber(held[2])
  if type(held) == 'table' and not held.err and held[1] == '1' and at then
    if at <= cutoff then
      redis.call('DEL', key)
      redis.call('ZREM', KEYS[1], key)
      pruned = pruned + 1
    else
      redis.call('ZADD', KEYS[1], at, key)
    end
  else
    redis.call('ZREM', KEYS[1], key)
  end
end
return pruned
"""

# KEYS[1] tombstones' index. ARGV: now, then keys a SCAN found: each tombstone among them that
# has no time yet (written before the index existed) gets `now` and joins the index.
_INDEX_TOMBSTONES = """
local added = 0
for i = 2, #ARGV do
  local held = redis.pcall('HMGET', ARGV[i], 'deleted', 'at')
  if type(held) == 'table' and not held.err and held[1] == '1' and not held[2] then
    redis.call('HSET', ARGV[i], 'at', ARGV[1])
    redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[i])
    added = added + 1
  end
end
return added
"""

# KEYS[1] person hash, KEYS[2] item set. ARGV: key prefix. One round trip for the whole read.
# One page of a verification: SCAN the page (ARGV cursor, match pattern, count), then sum the
# kept `h` of each entity hash by (`entity`, bucket `b`) for the entity types asked (ARGV[4..]),
# in the server, so a check moves one row per bucket, not one per entity. Returns the next
# cursor, then entity, bucket, digest and count per group. Sums stay below 2^53: exact in Lua.
_DIGEST_PAGE = """
local found = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local wanted = {}
for i = 4, #ARGV do wanted[ARGV[i]] = true end
local groups, order = {}, {}
for _, key in ipairs(found[2]) do
  -- A key of another type, or fields that are no bucket and contribution (written by hand),
  -- count as missing: the bucket differs and says so, and the check goes on.
  local v = redis.pcall('HMGET', key, 'entity', 'b', 'h', 'deleted')
  local b, h
  -- A tombstone counts nothing (messaging.digests): pruning it changes no digest.
  if type(v) == 'table' and not v.err and v[1] and wanted[v[1]] and v[4] ~= '1' then
    b, h = tonumber(v[2]), tonumber(v[3])
  end
  if b and h and b >= 0 and b < BUCKETS and b == math.floor(b)
      and h >= 0 and h < MODULUS and h == math.floor(h) then
    local group = v[1] .. ' ' .. b
    local g = groups[group]
    if not g then
      g = {v[1], b, 0, 0}
      groups[group] = g
      order[#order + 1] = g
    end
    g[3] = (g[3] + h) % MODULUS
    g[4] = g[4] + 1
  end
end
local out = {found[1]}
for _, g in ipairs(order) do
  out[#out + 1] = g[1]; out[#out + 1] = g[2]; out[#out + 1] = g[3]; out[#out + 1] = g[4]
end
return out
""".replace("MODULUS", str(sums.MODULUS)).replace("BUCKETS", str(sums.BUCKETS))

_READ = """
local person = redis.call('HMGET', KEYS[1], 'version', 'deleted', 'rev')
local out = {person[1] or '', person[2] or '', person[3] or '0'}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local item = redis.call('HMGET', ARGV[1] .. 'item:' .. id, 'kind', 'value', 'deleted')
  if item[3] == '0' then
    table.insert(out, item[1])
    table.insert(out, item[2])
  end
end
return out
"""


@dataclass(frozen=True)
class PersonChange:
    cpf: str
    version: int
    deleted: bool


@dataclass(frozen=True)
class ItemChange:
    item_id: str
    version: int
    deleted: bool
    cpf: str | None = None
    kind: str | None = None
    value: Decimal | None = None


Change = PersonChange | ItemChange


@dataclass(frozen=True)
class PersonScore:
    cpf: str
    score: int
    incomes: Decimal
    assets: Decimal
    debts: Decimal
    version: int
    person_version: int  # the person's entity_version the model holds


class ScoreStore:
    """The score read model in Redis."""

    def __init__(self, client: redis.Redis, prefix: str = "score:") -> None:
        self.client, self.prefix = client, prefix
        self._person = client.register_script(_APPLY_PERSON)
        self._item = client.register_script(_APPLY_ITEM)
        self._read = client.register_script(_READ)
        self._digest_page = client.register_script(_DIGEST_PAGE)
        self._prune_tombstones = client.register_script(_PRUNE_TOMBSTONES)
        self._index_tombstones = client.register_script(_INDEX_TOMBSTONES)
        self.generation_key = f"{prefix}{GENERATION_KEY}"
        self.tombstones_key = f"{prefix}{TOMBSTONES_KEY}"
        # The healing marker (messaging.healing.GenerationStore), one hash beside the data.
        self.marker = RedisGeneration(client, self.generation_key)

    def apply(self, changes: Sequence[Change]) -> list[bool]:
        """Apply changes in order, in one round trip; True for each that was newer.

        The scripts are called by their SHA (a pipeline of Script objects would first ask
        SCRIPT EXISTS, one more round trip per batch). If Redis does not know them (first use,
        a restart, SCRIPT FLUSH) they are loaded and the whole batch is sent again: the scripts
        are version-gated, so a change that did run is not applied twice.
        """
        with redis_errors():
            try:
                return self._apply(changes)
            except redis.exceptions.NoScriptError:
                for script in (self._person, self._item):
                    script.sha = self.client.script_load(script.script)
                return self._apply(changes)

    def _apply(self, changes: Sequence[Change]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        now = time.time()
        for change in changes:
            self._call(change, pipe, now)
        return [bool(r) for r in pipe.execute()]

    def _call(self, change: Change, pipe: Any, now: float) -> None:
        p = self.prefix
        if isinstance(change, PersonChange):
            pipe.evalsha(
                self._person.sha,
                2,
                f"{p}person:{change.cpf}",
                self.tombstones_key,
                change.version,
                int(change.deleted),
                sums.contribution("person", change.cpf, change.version),
                sums.bucket("person", change.cpf),
                now,
            )
        else:
            entity = change.kind or ""
            pipe.evalsha(
                self._item.sha,
                2,
                f"{p}item:{change.item_id}",
                self.tombstones_key,
                change.version,
                int(change.deleted),
                change.item_id,
                change.cpf or "",
                change.kind or "",
                "" if change.value is None else str(change.value),
                p,
                entity,
                sums.contribution(entity, change.item_id, change.version),
                sums.bucket(entity, change.item_id),
                now,
            )

    def read(self, cpf: str) -> PersonScore | None:
        """The person's score, or None if the person is unknown or deleted."""
        p = self.prefix
        raw = [
            v.decode() if isinstance(v, bytes) else v
            for v in self._read(keys=[f"{p}person:{cpf}", f"{p}person-items:{cpf}"], args=[p])
        ]
        version, deleted, rev = raw[0], raw[1], raw[2]
        if not version or deleted == "1":
            return None
        items = [(raw[i], _stored_value(raw[i + 1])) for i in range(3, len(raw), 2)]
        totals = {kind: sum((v for k, v in items if k == kind), Decimal("0.00")) for kind in KINDS}
        return PersonScore(
            cpf,
            score(items),
            totals["income"],
            totals["asset"],
            totals["debt"],
            int(rev),
            int(version),
        )

    def ping(self) -> None:
        with redis_errors():
            self.client.ping()

    def write_probe(self) -> None:
        """Prove Redis takes writes (an answering Redis may refuse them: out of memory, a
        read-only replica, a failed snapshot); the driver's error if it does not."""
        redis_write_probe(self.client, f"{self.prefix}probe")

    def consumer_probe(self) -> None:
        """write_probe as the consumer runtime reads it (StoreUnavailable)."""
        with redis_errors():
            self.write_probe()

    def wipe(self) -> int:
        """Delete every key of this read model, its generation marker last; return how many.

        While it runs the marker says `wiping` (renewed as it goes), so the consumer does not ask
        for a replay before the wipe is over; once the marker is gone it asks for one
        (healing.py). A wipe whose marker was taken over (it went stale) stops, raising Stale.
        """
        wipe_id = f"wipe-{uuid.uuid4()}"
        self.marker.begin_wipe(wipe_id, time.time())
        deleted = 0
        keys = self.client.scan_iter(match=f"{_glob_escape(self.prefix)}*", count=1000)
        for batch in _chunks((k for k in keys if k != self.generation_key.encode()), 1000):
            if not self.marker.renew_wipe(wipe_id, time.time()):
                raise StaleWipe("another process took this wipe over: it stopped")
            deleted += self.client.unlink(*batch)
        if not self.marker.abandon(wipe_id):
            raise StaleWipe("another process took this wipe over: it stopped")
        return deleted + 1

    # -- verification (messaging.verification.VerifiedStore) ----------------------------------
    def digests(self, entities: Collection[str]) -> sums.Digests:
        """The digests of what this model holds, summed from each entity's kept contribution
        as a SCAN of its keys finds them (an entity deleted by hand is missing), page by page in
        Redis itself (_DIGEST_PAGE)."""
        wanted = sorted(set(entities))
        found: sums.Digests = {}
        if not wanted:
            return found
        escaped = _glob_escape(self.prefix)
        with redis_errors():
            for pattern in (f"{escaped}person:*", f"{escaped}item:*"):
                cursor = b"0"
                while True:
                    reply = self._digest_page(args=[cursor, pattern, 1000, *wanted])
                    cursor = reply[0]
                    for i in range(1, len(reply), 4):
                        entity, where = _text(reply[i]), int(reply[i + 1])
                        digest, count = found.setdefault(entity, {}).get(where, (0, 0))
                        found[entity][where] = (
                            (digest + int(reply[i + 2])) % sums.MODULUS,
                            count + int(reply[i + 3]),
                        )
                    if cursor in (b"0", "0", 0):
                        break
        return found

    def held_versions(self, entity: str, buckets: list[int]) -> dict[str, int]:
        """The versions the digests count: tombstones left out, as the producer leaves out its
        deleted entities."""
        chosen = {str(b) for b in buckets}
        return {
            key.rsplit(":", 1)[1]: int(version)
            for key, found, where, _, version, deleted in self._entities(with_version=True)
            if found == entity
            and where in chosen
            and version
            and version.isdigit()
            and deleted != "1"
        }

    def last_divergence(self) -> dict[str, dict[str, int]]:
        with redis_errors():
            raw = self.client.get(f"{self.prefix}{VERIFICATION_KEY}")
        return json.loads(raw) if raw else {}

    def record_divergence(self, streaks: dict[str, dict[str, int]]) -> None:
        with redis_errors():
            self.client.set(f"{self.prefix}{VERIFICATION_KEY}", json.dumps(streaks))

    def _entities(self, with_version: bool = False) -> Iterator[tuple]:
        """(key, entity, bucket, contribution[, version, deleted]) of every entity hash, page
        by page."""
        fields = ["entity", "b", "h"] + (["version", "deleted"] if with_version else [])
        escaped = _glob_escape(self.prefix)
        with redis_errors():
            for pattern in (f"{escaped}person:*", f"{escaped}item:*"):
                pages = _chunks(self.client.scan_iter(match=pattern, count=1000), 1000)
                for keys in pages:
                    pipe = self.client.pipeline(transaction=False)
                    for key in keys:
                        pipe.hmget(key, fields)
                    # A key of another type answers an error in place of its fields: skipped.
                    found = pipe.execute(raise_on_error=False)
                    for key, values in zip(keys, found, strict=True):
                        if isinstance(values, Exception):
                            continue
                        yield (_text(key), *(_text(v) if v is not None else None for v in values))

    # -- retention of tombstones (score/retention.py) -----------------------------------------
    def due_tombstones(self, seconds: float, skip: list[str], limit: int) -> list[str]:
        """The keys of at most `limit` tombstones applied more than `seconds` ago, oldest first
        (none of `skip`). Tombstones from before the index are indexed first, once."""
        with redis_errors():
            self._index_old_tombstones()
            found = self.client.zrangebyscore(
                self.tombstones_key, "-inf", time.time() - seconds, start=0, num=limit + len(skip)
            )
        keys = [_text(key) for key in found if _text(key) not in skip]
        return keys[:limit]

    def prune_tombstones(self, seconds: float, keys: list[str]) -> int:
        """Delete those of `keys` that still are tombstones applied more than `seconds` ago."""
        if not keys:
            return 0
        with redis_errors():
            cutoff = time.time() - seconds
            return int(self._prune_tombstones(keys=[self.tombstones_key], args=[cutoff, *keys]))

    def _index_old_tombstones(self) -> None:
        """Give each tombstone written before the index existed a time (now: it is pruned one
        retention from now) and a place in the index; once, until a wipe removes the mark."""
        marker = f"{self.prefix}{TOMBSTONES_INDEXED_KEY}"
        if self.client.exists(marker):
            return
        now = time.time()
        escaped = _glob_escape(self.prefix)
        for pattern in (f"{escaped}person:*", f"{escaped}item:*"):
            for keys in _chunks(self.client.scan_iter(match=pattern, count=1000), 1000):
                self._index_tombstones(keys=[self.tombstones_key], args=[now, *keys])
        self.client.set(marker, now)

    def generation(self) -> Generation | None:
        return self.marker.generation()

    def mark_ready(self) -> None:
        """A fresh store that needs no replay (tests): mark its generation ready."""
        self.marker.mark_ready()

    # -- consumer replicas' beacons (the API's /ready and /metrics) ----------------------------
    def beat(self, replica: str, report: dict[str, Any], ttl: float) -> None:
        """Record what one consumer replica reports; it expires after `ttl` seconds."""
        now = time.time()
        index = f"{self.prefix}{BEACONS_KEY}"
        pipe = self.client.pipeline(transaction=False)
        pipe.set(f"{self.prefix}{BEACON_KEY}{replica}", json.dumps(report), ex=math.ceil(ttl))
        pipe.zadd(index, {replica: now})
        pipe.zremrangebyscore(index, "-inf", now - BEACON_FORGET_SECONDS)
        pipe.execute()

    def beacons(self) -> dict[str, dict[str, Any]]:
        """replica → its last report, for every replica whose report has not expired."""
        replicas = [r.decode() for r in self.client.zrange(f"{self.prefix}{BEACONS_KEY}", 0, -1)]
        if not replicas:
            return {}
        reports = self.client.mget([f"{self.prefix}{BEACON_KEY}{r}" for r in replicas])
        return {r: json.loads(raw) for r, raw in zip(replicas, reports, strict=True) if raw}


class StaleWipe(RuntimeError):
    """A wipe found its marker taken over: another process declared it stale."""


def _stored_value(text: str) -> Decimal:
    # An empty value is how versions before 2026-12 stored an item worth 0.
    return Decimal(text) if text else Decimal("0.00")


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _chunks(items: Any, size: int) -> Any:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
