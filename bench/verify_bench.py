"""What verification costs (messaging.verification): a check over 1,000,000 entities in each read
model's store, and what keeping the digests adds to the apply path.

Run: .venv/bin/python bench/verify_bench.py [--entities N]. Prints `name: value` lines (see
bench/README.md). Uses the local servers of relay_bench.py, under names of its own
(`bench-verify-<id>:*` Redis keys, a database `bench_verify_<id>`), removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import redis
from messaging import digests
from messaging.outbox import install
from messaging.relay import MARK_SQL
from notifier.migrate import migrate_database
from notifier.store import NotifierStore
from psycopg_pool import ConnectionPool
from relay_bench import DATABASE_URL, REDIS_URL
from score.store import ScoreStore
from stack_bench import with_dbname

log = logging.getLogger("verify_bench")
PAGE = 10_000
MARKED = 20_000  # outbox rows marked published, in the relay's batches of 100
BATCH = 100


def show(name: str, value: float) -> None:
    print(f"{name}: {value:.3f}" if value < 10 else f"{name}: {value:.1f}", flush=True)


@contextlib.contextmanager
def database(name: str) -> Iterator[str]:
    with psycopg.connect(DATABASE_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_dbname(DATABASE_URL, name)
    finally:
        with psycopg.connect(DATABASE_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def score_check_ms(client: Any, prefix: str, entities: int) -> float:
    """Fill the score's store with `entities` people as its apply leaves them (the hash with
    `entity`, `b`, `h`, `version`), then time one digest of all of it (`client`: one Redis or a
    Redis Cluster)."""
    store = ScoreStore(client, prefix)
    started = time.monotonic()
    for first in range(0, entities, PAGE):
        pipe = client.pipeline(transaction=False)
        for n in range(first, min(first + PAGE, entities)):
            cpf = f"{n:011d}"
            pipe.hset(
                store.person_key(cpf),
                mapping={
                    "version": 1,
                    "deleted": 0,
                    "rev": 1,
                    "entity": "person",
                    "b": digests.bucket("person", cpf),
                    "h": digests.contribution("person", cpf, 1),
                },
            )
        pipe.execute()
    log.info("%d score hashes written in %.1fs", entities, time.monotonic() - started)
    started = time.monotonic()
    held = store.digests({"person", "income", "asset", "debt"})
    elapsed = (time.monotonic() - started) * 1000
    assert sum(n for _, n in held["person"].values()) == entities, "the digest missed entities"
    return elapsed


def notifier_check_ms(url: str, entities: int) -> float:
    """The notifier's view with `entities` users (bucket and contribution as its apply writes
    them), then one digest of all of it."""
    migrate_database(url)
    bucket = digests.BUCKET_SQL.format(entity="'person'", entity_id="cpf")
    contribution = digests.CONTRIBUTION_SQL.format(
        entity="'person'", entity_id="cpf", version="version"
    )
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (cpf, name, email, status, version, registered_at) "
            "SELECT lpad(n::text, 11, '0'), 'B', 'b' || n || '@example.com', 'pending', 1, now() "
            "FROM generate_series(0, %s - 1) AS n",
            (entities,),
        )
        conn.execute(f"UPDATE users SET bucket = {bucket}, contribution = {contribution}")
        conn.execute("VACUUM ANALYZE users")
    log.info("%d users written in %.1fs", entities, time.monotonic() - started)
    with ConnectionPool(url, min_size=1, max_size=1, open=True) as pool:
        store = NotifierStore(pool)
        store.digests({"person"})  # the pool's connection and the plan, as in a running model
        started = time.monotonic()
        held = store.digests({"person"})
        elapsed = (time.monotonic() - started) * 1000
    assert sum(n for _, n in held["person"].values()) == entities, "the digest missed users"
    return elapsed


def model_apply_us() -> float:
    """Python CPU a model spends per applied event on its digest fields (bucket + contribution)."""
    started = time.process_time()
    for n in range(100_000):
        cpf = f"{n:011d}"
        digests.bucket("person", cpf)
        digests.contribution("person", cpf, 2)
    return (time.process_time() - started) / 100_000 * 1e6


def mark_ms_per_event(url: str, with_digests: bool) -> float:
    """The relay's marking of published rows, per event: its MARK_SQL (which keeps the producer's
    digests) or the same update without them, on MARKED fresh rows in batches of 100."""
    with psycopg.connect(url, autocommit=True) as conn:
        install(conn)
        conn.execute("TRUNCATE messaging_outbox, messaging_published, messaging_digests")
        conn.execute(
            "INSERT INTO messaging_outbox (event_id, entity, entity_id, entity_version, "
            "event_type, occurred_at, body) SELECT gen_random_uuid(), 'person', "
            "lpad(n::text, 11, '0'), 1, 'person.created', now(), '{}' "
            "FROM generate_series(1, %s) AS n",
            (MARKED,),
        )
        ids = [r[0] for r in conn.execute("SELECT id FROM messaging_outbox ORDER BY id")]
        plain = "UPDATE messaging_outbox SET published_at = now() WHERE id = ANY(%s)"
        started = time.monotonic()
        for first in range(0, len(ids), BATCH):
            with conn.transaction():
                conn.execute(MARK_SQL if with_digests else plain, (ids[first : first + BATCH],))
        return (time.monotonic() - started) * 1000 / len(ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s", level="INFO")
    try:
        run(args.entities)
    except Exception as exc:  # the figure could not be measured: say why
        log.exception("verify_bench failed: %s", exc)
        return 1
    return 0


def run(entities: int) -> None:
    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench-verify-{run_id}:"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        show("verify_entities", entities)
        score_ms = score_check_ms(client, prefix, entities)
        show("verify_score_ms", score_ms)
    finally:
        for keys in _pages(client.scan_iter(match=f"{prefix}*", count=PAGE)):
            client.unlink(*keys)
    with database(f"bench_verify_{run_id}") as url:
        notifier_ms = notifier_check_ms(url, entities)
        show("verify_notifier_ms", notifier_ms)
        show("verify_ms", max(score_ms, notifier_ms))  # the slower model's check
        # Alternated and the best of three each, so neither gains from going second.
        runs = [(mark_ms_per_event(url, False), mark_ms_per_event(url, True)) for _ in range(3)]
        plain, kept = min(r[0] for r in runs), min(r[1] for r in runs)
    apply_us = model_apply_us()
    show("digest_model_apply_us", apply_us)
    show("digest_mark_extra_us", max(0.0, kept - plain) * 1000)
    # A registration is one event applied by two models and marked once by the relay.
    show("digest_cost_ms_per_registration", (2 * apply_us + max(0.0, kept - plain) * 1000) / 1000)


def _pages(keys: Iterator[bytes]) -> Iterator[list[bytes]]:
    page: list[bytes] = []
    for key in keys:
        page.append(key)
        if len(page) == PAGE:
            yield page
            page = []
    if page:
        yield page


if __name__ == "__main__":
    sys.exit(main())
