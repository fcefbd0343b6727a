"""All Redis access of the score service: version-gated Lua scripts and the score read.

It runs unchanged on one Redis or on a Redis Cluster (messaging.redis_client reads which from
SCORE_REDIS_URL). Key layout (prefix `SCORE_KEY_PREFIX`, default `score:`; `{...}` is a hash
tag: a cluster keeps every key with the same tag in one slot):

- `score:person:{<cpf>}`      hash: `version` (person entity_version), `deleted` (0/1),
                              `rev` (bumped by every change of the person or of its items),
                              `at` (a tombstone's: when the deletion was applied, epoch seconds)
- `score:items:{<cpf>}`       set of the ids of the person's items: an index, in the person's
                              slot, so reading a score asks one slot for it
- `score:item:{<id>}`         hash: `version`, `deleted`, `cpf`, `kind`, `value` (decimal
                              string), `at` (as the person's): the item's own state, in its own
                              slot (its deletion names only its id)
- `score:tombstones`          sorted set of the tombstones' keys, by `at`: what the retention
                              prunes (TOMBSTONE_RETENTION_DAYS), found without a SCAN
- `score:generation:2`        hash: `state` (ready/rebuilding/wiping), `request`, `since`,
                              `expected` and `settled`: the marker a store that lost its data is
                              missing (healing.py). `2` is the key layout's: a store of the
                              layout before it (no hash tags) has none, so it heals by a replay
- `score:verification`        the last check's divergent buckets (verification.py)
- `score:probe`               the consumer's write probe: written while a pause waits
- `score:consumer:<replica>`  what one consumer replica last reported (JSON: `health`,
                              `stats`), expiring unless beaten again
- `score:consumers`           sorted set of the replicas that beat, by last beat (epoch seconds):
                              the index of the keys above, without a SCAN

Each change is a script on the keys of one slot, every key named in KEYS, that compares
`entity_version` with the stored one and applies only a newer one, atomically, so duplicates,
reordering and replays converge. Deletions leave tombstones (the hash with `deleted` 1 and its
version), so a late event cannot bring an entity back; they count nothing in the digests and are
pruned after TOMBSTONE_RETENTION_DAYS (docs/guarantees.md says why that is safe). The tombstones'
index is one key, in a slot of its own: a deletion joins it in a second step, from what the
entity's script answered (so a redelivered deletion joins it too), and the pruning checks each
entity's own hash before deleting it, then mends the index.

An item's change touches two slots, its own and its person's, in two scripts: the set is only
an index, and a read counts an item only if its own hash says it is live and whose it is. An
item's creation adds it to the set before it is applied (same connection, so a replica that lost
the set entry lost the item too); its deletion, which does not name the person, takes it out
once the item's hash said whose it was. So a replayed creation mends a set a wipe emptied, a
replayed deletion removes what a wipe left. On a cluster the set and the item live on different
masters, which fail over apart: verification there also counts a live item missing from its
person's set as missing.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

import redis
from messaging import digests as sums
from messaging.generations import RedisGeneration
from messaging.healing import Generation
from messaging.stores import is_cluster, redis_client, redis_errors, redis_write_probe

from .scoring import KINDS, score

LAYOUT = 2  # the key layout's version, in the generation marker's name
GENERATION_KEY = f"generation:{LAYOUT}"
TOMBSTONES_KEY = "tombstones"  # the tombstones' index: key -> when the deletion was applied
VERIFICATION_KEY = "verification"  # the last check's divergent buckets (verification.py)
BEACON_KEY = "consumer:"  # + replica id
BEACONS_KEY = "consumers"
BEACON_FORGET_SECONDS = 3600.0  # a replica that has not beaten for this long leaves the index
PAGE = 1000  # keys per SCAN page, and per UNLINK

# A tombstone's time, in both apply scripts (KEYS[1] the entity's hash): `at` while it is
# deleted, none once it lives again.
_TOMBSTONE_LUA = """
local function tombstone(deleted, now)
  if deleted == '1' then redis.call('HSET', KEYS[1], 'at', now)
  else redis.call('HDEL', KEYS[1], 'at') end
end
"""

# KEYS[1] person hash. ARGV: version, deleted, contribution, bucket (messaging.digests: kept
# beside the version, so verification sums what the model holds), now. Returns 1 if applied (0
# if not newer), then whether the person is deleted now and since when ('' if not). A deletion
# does not cascade to the items: the producer emits each item's own deletion first, and under
# reordering a cascade could remove an item that belongs to the person's next life.
_APPLY_PERSON = (
    _TOMBSTONE_LUA
    + """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local version = tonumber(ARGV[1])
if stored >= version then
  local held = redis.call('HMGET', KEYS[1], 'deleted', 'at')
  return {0, held[1] or '0', held[2] or ''}
end
redis.call('HSET', KEYS[1], 'version', version, 'deleted', ARGV[2], 'entity', 'person',
           'h', ARGV[3], 'b', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'rev', 1)
tombstone(ARGV[2], ARGV[5])
return {1, ARGV[2], ARGV[2] == '1' and ARGV[5] or ''}
"""
)

# KEYS[1] item hash; on one Redis, for a creation, KEYS[2] and KEYS[3] the person's item set
# and hash, which gains the item first as _INDEX_ITEM would (a cluster sends _INDEX_ITEM before:
# they are in another slot). ARGV: version, deleted, cpf ('' on a deletion), kind, value, entity
# (its kind, on a deletion too), contribution, bucket, now, item id. Returns 1 if applied (0 if
# not newer), then whether the item is deleted now, since when ('' if not), and whose it is (''
# while no event of it named its person).
_APPLY_ITEM = (
    _TOMBSTONE_LUA
    + """
if #KEYS == 3 and redis.call('SADD', KEYS[2], ARGV[10]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'rev', 1)
end
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local version = tonumber(ARGV[1])
if stored >= version then
  local held = redis.call('HMGET', KEYS[1], 'deleted', 'at', 'cpf')
  return {0, held[1] or '0', held[2] or '', held[3] or ''}
end
local cpf = ARGV[3]
if cpf == '' then cpf = redis.call('HGET', KEYS[1], 'cpf') or '' end
redis.call('HSET', KEYS[1], 'version', version, 'deleted', ARGV[2], 'cpf', cpf,
           'entity', ARGV[6], 'h', ARGV[7], 'b', ARGV[8])
if ARGV[2] == '0' then redis.call('HSET', KEYS[1], 'kind', ARGV[4], 'value', ARGV[5]) end
tombstone(ARGV[2], ARGV[9])
return {1, ARGV[2], ARGV[2] == '1' and ARGV[9] or '', cpf}
"""
)

# KEYS[1] an entity's hash. ARGV: the cutoff (epoch seconds). Deletes it only if it still is a
# tombstone applied before the cutoff: {1}; one applied since: {2, its time}; anything else (it
# lives again, another type, fields written by hand, gone): {0}, untouched.
_PRUNE_TOMBSTONE = """
local held = redis.pcall('HMGET', KEYS[1], 'deleted', 'at')
if type(held) ~= 'table' or held.err or held[1] ~= '1' or not tonumber(held[2]) then
  return {0}
end
if tonumber(held[2]) <= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return {1}
end
return {2, held[2]}
"""

# KEYS[1] the person's item set, KEYS[2] the person hash. ARGV: item id, 'add' or 'remove'.
# A change of the set is a change of the person's score: its revision grows.
_INDEX_ITEM = """
local changed
if ARGV[2] == 'add' then changed = redis.call('SADD', KEYS[1], ARGV[1])
else changed = redis.call('SREM', KEYS[1], ARGV[1]) end
if changed == 1 then redis.call('HINCRBY', KEYS[2], 'rev', 1) end
return changed
"""

# KEYS[1] person hash, KEYS[2] the person's item set: the person's version, deleted and rev,
# then its item ids if it is live. The items themselves are in their own slots.
_READ_PERSON = """
local person = redis.call('HMGET', KEYS[1], 'version', 'deleted', 'rev')
local out = {person[1] or '', person[2] or '', person[3] or '0'}
if person[1] and person[2] ~= '1' then
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do out[#out + 1] = id end
end
return out
"""

# One page of a verification on one Redis (never sent to a cluster, whose scripts may touch
# only the keys they name): SCAN the page (ARGV cursor, match pattern, count), then sum the
# kept `h` of each entity hash by (`entity`, bucket `b`) for the entity types asked (ARGV[4..]),
# in the server, so a check moves one row per bucket, not one per entity: several times faster
# than reading each hash (bench/verify_bench.py). Returns the next cursor, then entity, bucket,
# digest and count per group. Sums stay below 2^53: exact in Lua.
_DIGEST_PAGE = """
local found = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local people, items = ARGV[4], ARGV[5]
local wanted = {}
for i = 6, #ARGV do wanted[ARGV[i]] = true end
local groups, order = {}, {}
for _, key in ipairs(found[2]) do
  -- Only the entities' hashes (a person's set of items, the markers and indexes aside).
  local v = nil
  if key:sub(1, #people) == people or key:sub(1, #items) == items then
    -- A key of another type, or fields that are no bucket and contribution (written by hand),
    -- count as missing: the bucket differs and says so, and the check goes on.
    v = redis.pcall('HMGET', key, 'entity', 'b', 'h', 'deleted')
  end
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


class Held(NamedTuple):
    """One entity hash as a SCAN found it (fields None where absent)."""

    key: str
    item: bool  # an item's hash (else a person's)
    entity_id: str
    entity: str | None
    bucket: str | None
    contribution: str | None
    version: str | None
    deleted: str | None
    cpf: str | None


_HELD_FIELDS = ["entity", "b", "h", "version", "deleted", "cpf"]


class ScoreStore:
    """The score read model in Redis, one server or a cluster."""

    def __init__(self, client: Any, prefix: str = "score:") -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix {prefix!r} holds a brace: the keys' hash tags")
        self.client, self.prefix = client, prefix
        self.cluster = is_cluster(client)
        self._person = client.register_script(_APPLY_PERSON)
        self._item = client.register_script(_APPLY_ITEM)
        self._index = client.register_script(_INDEX_ITEM)
        self._read = client.register_script(_READ_PERSON)
        self._digest_page = client.register_script(_DIGEST_PAGE)
        self._prune = client.register_script(_PRUNE_TOMBSTONE)
        self.generation_key = f"{prefix}{GENERATION_KEY}"
        self.tombstones_key = f"{prefix}{TOMBSTONES_KEY}"
        # The healing marker (messaging.healing.GenerationStore), one hash beside the data.
        self.marker = RedisGeneration(client, self.generation_key)

    @classmethod
    def from_url(cls, url: str, prefix: str = "score:") -> ScoreStore:
        """The store on the Redis or Redis Cluster `url` names (messaging.redis_client)."""
        return cls(redis_client(url), prefix)

    # -- keys ----------------------------------------------------------------------------------
    def person_key(self, cpf: str) -> str:
        return f"{self.prefix}person:{{{cpf}}}"

    def items_key(self, cpf: str) -> str:
        """The set of the person's item ids, in the person's slot."""
        return f"{self.prefix}items:{{{cpf}}}"

    def item_key(self, item_id: str) -> str:
        return f"{self.prefix}item:{{{item_id}}}"

    # -- changes -------------------------------------------------------------------------------
    def apply(self, changes: Sequence[Change]) -> list[bool]:
        """Apply changes in order; True for each that was newer. One round trip, and a second
        for what the first said: the deleted items whose person it found leave the person's
        set, the deleted entities join the tombstones' index.

        The scripts are called by their SHA (a pipeline of Script objects would first ask
        SCRIPT EXISTS, one more round trip per batch; redis-py's cluster pipeline has no
        `evalsha`, but passes the command on). If Redis does not know them (first use,
        a restart, SCRIPT FLUSH, a replica that took over) they are loaded and the whole batch
        is sent again: every step is version-gated or idempotent, so a change that did run is
        not applied twice.
        """
        return self._scripted(lambda: self._apply(changes))

    def _scripted(self, run: Callable[[], Any]) -> Any:
        """`run()`, loading the scripts and running it again if Redis does not know them."""
        with redis_errors():
            try:
                return run()
            except redis.exceptions.NoScriptError:
                for script in (self._person, self._item, self._index, self._prune):
                    script.sha = self.client.script_load(script.script)
                return run()

    def _apply(self, changes: Sequence[Change]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        now = time.time()
        for change in changes:
            self._queue(change, pipe, now)
        replies = iter(pipe.execute())
        applied, removals, tombstones = [], [], {}
        for change in changes:
            if isinstance(change, PersonChange):
                done, deleted, at = next(replies)
                key = self.person_key(change.cpf)
            else:
                if self._indexed_apart(change):
                    next(replies)
                done, deleted, at, whose = next(replies)
                key = self.item_key(change.item_id)
                owner = _text(whose) or change.cpf or ""
                if _text(deleted) == "1" and owner:
                    removals.append((owner, change.item_id))
            applied.append(bool(done))
            if _text(deleted) == "1" and at:
                tombstones.setdefault(key, float(at))
        if removals or tombstones:
            pipe = self.client.pipeline(transaction=False)
            for cpf, item_id in removals:
                self._index_call(pipe, cpf, item_id, "remove")
            if tombstones:  # only where there is none: a redelivery keeps the first time
                pipe.zadd(self.tombstones_key, tombstones, nx=True)
            pipe.execute()
        return applied

    def _queue(self, change: Change, pipe: Any, now: float) -> None:
        if isinstance(change, PersonChange):
            self._evalsha(
                pipe,
                self._person,
                [self.person_key(change.cpf)],
                change.version,
                int(change.deleted),
                sums.contribution("person", change.cpf, change.version),
                sums.bucket("person", change.cpf),
                now,
            )
            return
        keys = [self.item_key(change.item_id)]
        if self._indexed_apart(change):
            self._index_call(pipe, change.cpf or "", change.item_id, "add")
        elif _indexed_first(change):  # one Redis: in the item's own script, one call fewer
            keys += [self.items_key(change.cpf or ""), self.person_key(change.cpf or "")]
        entity = change.kind or ""
        self._evalsha(
            pipe,
            self._item,
            keys,
            change.version,
            int(change.deleted),
            change.cpf or "",
            change.kind or "",
            "" if change.value is None else str(change.value),
            entity,
            sums.contribution(entity, change.item_id, change.version),
            sums.bucket(entity, change.item_id),
            now,
            change.item_id,
        )

    def _indexed_apart(self, change: ItemChange) -> bool:
        """A creation on a cluster: the person's set gains it in a script of its own, first."""
        return self.cluster and _indexed_first(change)

    def _index_call(self, pipe: Any, cpf: str, item_id: str, how: str) -> None:
        self._evalsha(pipe, self._index, [self.items_key(cpf), self.person_key(cpf)], item_id, how)

    def _evalsha(self, pipe: Any, script: Any, keys: list[str], *args: Any) -> None:
        """Queue a script on a pipeline by its SHA. On a cluster it goes straight to the master
        of its keys' slot: redis-py's cluster pipeline would first ask the server which of an
        EVALSHA's arguments are keys (COMMAND GETKEYS), one more round trip per script. A
        redirection (the slot moved, a failover) is followed as redis-py follows any."""
        if self.cluster:
            node = self.client.get_node_from_key(keys[0])
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, target_nodes=node)
        else:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    def read(self, cpf: str) -> PersonScore | None:
        """The person's score, or None if the person is unknown or deleted: the person and its
        item ids from its slot, then its items from theirs."""
        with redis_errors():
            raw = [_text(v) for v in self._read(keys=[self.person_key(cpf), self.items_key(cpf)])]
            version, deleted, rev = raw[0], raw[1], raw[2]
            if not version or deleted == "1":
                return None
            held = []
            if len(raw) > 3:
                pipe = self.client.pipeline(transaction=False)
                for item_id in raw[3:]:
                    pipe.hmget(self.item_key(item_id), ["kind", "value", "deleted", "cpf"])
                held = pipe.execute()
        # The set is an index: the item's own hash says whether it counts, and whose it is.
        items = [
            (kind.decode(), Decimal(value.decode()))
            for kind, value, gone, owner in held
            if gone == b"0" and owner == cpf.encode() and kind and value
        ]
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
        On a cluster the SCAN walks every master.
        """
        wipe_id = f"wipe-{uuid.uuid4()}"
        self.marker.begin_wipe(wipe_id, time.time())
        deleted = 0
        for node, keys in self._scan(f"{_glob_escape(self.prefix)}*"):
            if not self.marker.renew_wipe(wipe_id, time.time()):
                raise StaleWipe("another process took this wipe over: it stopped")
            pipe = node.pipeline(transaction=False)
            for key in keys:
                if key != self.generation_key.encode():
                    pipe.unlink(key)
            deleted += sum(pipe.execute())
        if not self.marker.abandon(wipe_id):
            raise StaleWipe("another process took this wipe over: it stopped")
        return deleted + 1

    def unlink(self, keys: Sequence[Any]) -> int:
        """Delete keys of any slots; how many there were."""
        if not keys:
            return 0
        if not self.cluster:
            return int(self.client.unlink(*keys))
        pipe = self.client.pipeline(transaction=False)  # one round trip per master, not per slot
        for key in keys:
            pipe.unlink(key)
        return sum(pipe.execute())

    # -- verification (messaging.verification.VerifiedStore) ----------------------------------
    def digests(self, entities: Collection[str]) -> sums.Digests:
        """The digests of what this model holds, summed from each entity's kept contribution
        as a SCAN of its keys finds them (an entity deleted by hand is missing). On one Redis,
        page by page in Redis itself (_DIGEST_PAGE); on a cluster, from each hash read on every
        master, a live item counting only if its person's set holds it (the set and the item
        are in different slots, which fail over apart)."""
        found: sums.Digests = {}
        for page in self.digest_pages(entities):
            sums.merge(found, page)
        return found

    def digest_pages(self, entities: Collection[str]) -> Iterator[sums.Digests]:
        """The same digests a SCAN page (PAGE keys) at a time: a verification sums them
        between the consumer's batches, so events are not held back for the whole walk."""
        wanted = sorted(set(entities))
        if not wanted:
            return
        pages = self._pages_in_redis(wanted) if not self.cluster else self._pages_read(wanted)
        while True:
            with redis_errors():
                page = next(pages, None)
            if page is None:
                return
            yield page

    def _pages_in_redis(self, wanted: list[str]) -> Iterator[sums.Digests]:
        pattern, cursor = f"{_glob_escape(self.prefix)}*", b"0"
        while True:
            reply = self._digest_page(
                args=[cursor, pattern, PAGE, *self._entity_prefixes(), *wanted]
            )
            cursor = reply[0]
            found: sums.Digests = {}
            for i in range(1, len(reply), 4):
                _add(found, _text(reply[i]), int(reply[i + 1]), int(reply[i + 2]),
                     int(reply[i + 3]))  # fmt: skip
            yield found
            if cursor in (b"0", "0", 0):
                return

    def _pages_read(self, wanted: list[str]) -> Iterator[sums.Digests]:
        chosen = set(wanted)
        for page in self._held_pages():
            live = [h for h in page if h.item and h.deleted == "0" and h.cpf]
            unindexed: set[str] = set()
            if live:
                pipe = self.client.pipeline(transaction=False)
                for held in live:
                    pipe.sismember(self.items_key(held.cpf or ""), held.entity_id)
                unindexed = {h.key for h, yes in zip(live, pipe.execute(), strict=True) if not yes}
            found: sums.Digests = {}
            for held in page:
                part = _digest_part(held, chosen)
                if part is not None and held.key not in unindexed:
                    _add(found, *part, 1)
            yield found

    def held_versions(self, entity: str, buckets: list[int]) -> dict[str, int]:
        """The versions the digests count: tombstones left out, as the producer leaves out its
        deleted entities."""
        chosen = {str(b) for b in buckets}
        with redis_errors():
            return {
                held.entity_id: int(held.version)
                for page in self._held_pages()
                for held in page
                if held.entity == entity
                and held.bucket in chosen
                and held.version
                and held.version.isdigit()
                and held.deleted != "1"
            }

    def last_divergence(self) -> dict[str, dict[str, int]]:
        with redis_errors():
            raw = self.client.get(f"{self.prefix}{VERIFICATION_KEY}")
        return json.loads(raw) if raw else {}

    def record_divergence(self, streaks: dict[str, dict[str, int]]) -> None:
        with redis_errors():
            self.client.set(f"{self.prefix}{VERIFICATION_KEY}", json.dumps(streaks))

    def _entity_prefixes(self) -> tuple[str, str]:
        """How the names of the people's and the items' hashes begin (not the layout before
        2's). One SCAN of the prefix finds both: a SCAN walks the whole keyspace whatever its
        pattern, so one per kind of hash would walk it twice."""
        return f"{self.prefix}person:{{", f"{self.prefix}item:{{"

    def _held_pages(self) -> Iterator[list[Held]]:
        """Every entity hash, a page at a time, on every master of a cluster."""
        people, items = self._entity_prefixes()
        for node, found in self._scan(f"{_glob_escape(self.prefix)}*"):
            keys = [(key, _text(key)) for key in found]
            keys = [(raw, key) for raw, key in keys if key.startswith((people, items))]
            pipe = node.pipeline(transaction=False)
            for raw, _key in keys:
                pipe.hmget(raw, _HELD_FIELDS)
            # A key of another type answers an error in place of its fields: skipped.
            answers = pipe.execute(raise_on_error=False) if keys else []
            page = []
            for (_raw, key), values in zip(keys, answers, strict=True):
                if isinstance(values, Exception):
                    continue
                fields = (None if v is None else _text(v) for v in values)
                item = key.startswith(items)
                page.append(Held(key, item, key[key.index("{") + 1 : -1], *fields))
            yield page

    # -- retention of tombstones (score/retention.py) -----------------------------------------
    def due_tombstones(self, seconds: float, skip: list[str], limit: int) -> list[str]:
        """The keys of at most `limit` tombstones applied more than `seconds` ago, oldest first
        (none of `skip`)."""
        with redis_errors():
            found = self.client.zrangebyscore(
                self.tombstones_key, "-inf", time.time() - seconds, start=0, num=limit + len(skip)
            )
        keys = [_text(key) for key in found if _text(key) not in skip]
        return keys[:limit]

    def prune_tombstones(self, seconds: float, keys: list[str]) -> int:
        """Delete those of `keys` that still are tombstones applied more than `seconds` ago, each
        in a script on its own slot; then the index: a deleted one or one that lives again leaves
        it, one deleted again since stays at its new time. How many were deleted."""
        if not keys:
            return 0
        cutoff = time.time() - seconds

        def prune() -> int:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                self._evalsha(pipe, self._prune, [key], cutoff)
            answers = pipe.execute()
            pipe = self.client.pipeline(transaction=False)
            gone = [key for key, answer in zip(keys, answers, strict=True) if answer[0] != 2]
            later = {k: float(a[1]) for k, a in zip(keys, answers, strict=True) if a[0] == 2}
            if gone:
                pipe.zrem(self.tombstones_key, *gone)
            if later:
                pipe.zadd(self.tombstones_key, later)
            pipe.execute()
            return sum(1 for answer in answers if answer[0] == 1)

        return int(self._scripted(prune))

    def _scan(self, pattern: str) -> Iterator[tuple[Any, list[bytes]]]:
        """Pages of the keys that match, each with a client of the server that holds them: the
        one Redis, or in turn each master of a cluster (a plain client of that node: its keys
        are its own, and redis-py's cluster pipeline would route each command again)."""
        nodes = (
            [self.client.get_redis_connection(n) for n in self.client.get_primaries()]
            if self.cluster
            else [self.client]
        )
        for node in nodes:
            for keys in _chunks(node.scan_iter(match=pattern, count=PAGE), PAGE):
                yield node, keys

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
        pipe = self.client.pipeline(transaction=False)  # the reports may be in several slots
        for replica in replicas:
            pipe.get(f"{self.prefix}{BEACON_KEY}{replica}")
        reports = pipe.execute()
        return {r: json.loads(raw) for r, raw in zip(replicas, reports, strict=True) if raw}


class StaleWipe(RuntimeError):
    """A wipe found its marker taken over: another process declared it stale."""


def _indexed_first(change: ItemChange) -> bool:
    """A creation names its person: the item joins the person's set before it is applied."""
    return not change.deleted and bool(change.cpf)


def _digest_part(held: Held, wanted: set[str]) -> tuple[str, int, int] | None:
    """(entity, bucket, contribution) of a hash, as _DIGEST_PAGE reads it; None for a hash
    whose fields are no bucket and contribution (written by hand): it counts as missing."""
    if held.entity not in wanted or held.deleted == "1":  # a tombstone counts nothing
        return None
    try:
        bucket, part = int(held.bucket or ""), int(held.contribution or "")
    except ValueError:
        return None
    if not (0 <= bucket < sums.BUCKETS and 0 <= part < sums.MODULUS):
        return None
    return held.entity, bucket, part


def _add(found: sums.Digests, entity: str, bucket: int, digest: int, count: int) -> None:
    held, entities = found.setdefault(entity, {}).get(bucket, (0, 0))
    found[entity][bucket] = ((held + digest) % sums.MODULUS, entities + count)


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
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
