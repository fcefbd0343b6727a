"""Figures of the whole native stack: the Procfile's processes and Traefik, on local servers.

Run: .venv/bin/python bench/stack_bench.py. Prints one `name: value` line per figure (see
bench/README.md), logs to stderr, and exits non-zero only if a figure could not be measured.

The stack runs on databases, an exchange, queues, a Redis key prefix and ports of its own
(`bench_person_<id>`, `bench_notifier_<id>`, `bench-<id>`), all removed afterwards, even when a
step fails. E-mails go to the development mailbox (SENDGRID_API_KEY is blanked).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pika
import psycopg
import redis
from messaging import Envelope
from messaging.connection import connect
from messaging.replay import requests_queue
from messaging.topology import DEFAULT_RETRY_DELAYS, Topology
from person.catalogue import PRODUCER, item_data, person_data
from post_bench import (
    CpuMeter,
    measure_alone,
    need_wrk,
    open_loop,
    percentile,
    wait_for,
    wrk_post,
)
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from relay_bench import AMQP_URL, DATABASE_URL, REDIS_URL
from score.store import ScoreStore
from stack.processes import Gateway, Processes, free_port

ROOT = Path(__file__).resolve().parent.parent

E2E_PEOPLE = 25_000  # each registered with one income: 50,000 events
REBUILD_PEOPLE = 50_000  # E2E_PEOPLE and as many more, one income each: 100,000 events
LATENCY_PEOPLE = 2_000  # people to add incomes to when the latency step runs alone
BULK_PEOPLE = 100_000
PREFILL_CHUNK = 5_000  # people per round of COPY statements
LATENCY_RATE = 200.0  # writes per second: the unsuffixed latency figures
LATENCY_RATES = (150.0, LATENCY_RATE)  # the others are printed as <figure>_at_<rate>
LATENCY_SECONDS = 15.0
LATENCY_WRITERS = 8  # client threads sharing the write schedule
POLL_INTERVAL = 0.005  # seconds between two visibility polls while a write is pending (see README)
VISIBLE_TIMEOUT = 30.0  # a write not visible by then is lost: the figure is not measured
POST_CLIENTS = 16
POST_SECONDS = 10.0
COST_RATES = (50.0, 100.0, 150.0, 200.0)  # registrations per second, open loop: the curve
COST_RATE = 100.0  # below saturation: the unsuffixed cpu_ms_per_registration and its parts
POST_P99_RATE = 200.0  # the unsuffixed post_person_p50_ms / post_person_p99_ms
COST_SECONDS = 15.0
READY_TIMEOUT = 90.0
REPLICATE_TIMEOUT = 180.0
REBUILD_TIMEOUT = 180.0
SETTLE_TIMEOUT = 120.0
CHECK_INTERVAL = 0.01  # seconds between two catch-up checks
STOP_TIMEOUT = 20.0
HOSTS = ("person", "score", "notifier")
RELAY = "person-relay"
POST_PHASES = itertools.count()  # keeps the CPFs of two POST phases in one process apart

log = logging.getLogger("bench.stack")


class MeasureError(RuntimeError):
    """A figure could not be measured."""


# -- the stack -------------------------------------------------------------------------------
def with_dbname(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


class Stack(Processes):
    """The Procfile's processes (stack/processes.py) with this run's environment."""

    def __init__(self, run_id: str, env: dict[str, str], log_dir: Path) -> None:
        super().__init__(env, log_dir)
        self.run_id = run_id

    @property
    def exchange(self) -> str:
        return self.env["EVENTS_EXCHANGE"]

    @property
    def prefix(self) -> str:
        return self.env["SCORE_KEY_PREFIX"]

    @property
    def person_db(self) -> str:
        return self.env["PERSON_DATABASE_URL"]

    @property
    def notifier_db(self) -> str:
        return self.env["NOTIFIER_DATABASE_URL"]

    @property
    def gateway_port(self) -> int:
        return int(self.env["GATEWAY_PORT"])

    @property
    def retry_delays(self) -> tuple[float, ...]:
        return tuple(json.loads(self.env["RETRY_DELAYS"]))

    def topologies(self) -> list[Topology]:
        return [Topology(s, self.exchange, self.retry_delays) for s in ("score", "notifier")]

    @contextlib.contextmanager
    def channel(self) -> Iterator[Any]:
        """A short-lived channel on this stack's broker (a node of AMQP_URL that answers)."""
        conn = connect(self.env["AMQP_URL"], "stack-bench")
        try:
            yield conn.channel()
        finally:
            if conn.is_open:
                conn.close()

    def score_store(self) -> ScoreStore:
        """The score's store as the stack's processes see it (SCORE_REDIS_URL: one Redis or a
        Redis Cluster)."""
        return ScoreStore.from_url(self.env["SCORE_REDIS_URL"], self.prefix)

    def check_alive(self) -> None:
        """Raise if a process this run started has exited."""
        gone = self.exited()
        if gone:
            raise MeasureError(f"process(es) exited: {gone}; logs in {self.log_dir}")

    def stop_everything(self) -> None:
        for name, why in self.stop_all(STOP_TIMEOUT).items():
            log.warning("%s %s; killed it", name, why)


def stack_environment(run_id: str) -> dict[str, str]:
    exchange = f"bench-{run_id}"
    env = {
        **os.environ,
        "GATEWAY_PORT": str(free_port()),
        "PERSON_PORT": str(free_port()),
        "SCORE_PORT": str(free_port()),
        "NOTIFIER_PORT": str(free_port()),
        "PERSON_DATABASE_URL": with_dbname(DATABASE_URL, f"bench_person_{run_id}"),
        "NOTIFIER_DATABASE_URL": with_dbname(DATABASE_URL, f"bench_notifier_{run_id}"),
        "SCORE_REDIS_URL": REDIS_URL,
        "SCORE_KEY_PREFIX": f"{exchange}:",
        "AMQP_URL": AMQP_URL,
        "EVENTS_EXCHANGE": exchange,
        "RETRY_DELAYS": json.dumps(list(DEFAULT_RETRY_DELAYS)),
        "SENDGRID_API_KEY": "",  # blank, even if .env sets one: e-mails go to the mailbox
        # Load from one address: Traefik's per-client rate limit must fit it (docs/security.md).
        "RATE_LIMIT_AVERAGE": "1000000",
        "RATE_LIMIT_BURST": "1000000",
        # cluster_bench.py's writer adds an income to one person every 20 ms through a failover.
        "ITEMS_PER_PERSON_MAX": "1000000",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("PUBLIC_PERSON_URL", "BIND"):
        env.pop(name, None)
    return env


@contextlib.contextmanager
def running_stack(run_id: str, overrides: dict[str, str] | None = None) -> Iterator[Stack]:
    """Create and migrate the databases, declare the queues, start every process but the relay
    (or relays: the environment, with `overrides`, says how many copies of each process run).

    Everything made is removed on the way out, whatever happened.
    """
    log_dir = Path(tempfile.mkdtemp(prefix=f"stack-bench-{run_id}-"))
    stack = Stack(run_id, {**stack_environment(run_id), **(overrides or {})}, log_dir)
    ok = False
    try:
        for step in (
            ["-m", "person.migrate"],
            ["-m", "notifier.migrate"],
            ["-m", "messaging.cli", "declare", "score", "notifier"],
        ):
            done = subprocess.run(
                [sys.executable, *step], env=stack.env, cwd=ROOT, capture_output=True, text=True
            )
            if done.returncode != 0:
                raise MeasureError(f"{' '.join(step)} failed: {done.stderr.strip()[-2000:]}")
        # A new score model over a new outbox has nothing to heal from; without its marker the
        # consumers would ask for a replay that only the relay, started later, serves, and /ready
        # would say `rebuilding` until then.
        stack.score_store().mark_ready()
        stack.start_all(but=(RELAY,))
        wait_ready(stack)
        yield stack
        ok = True
    finally:
        stack.stop_everything()
        cleanup(stack)
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            log.error("process logs kept in %s", log_dir)


def wait_ready(stack: Stack) -> None:
    """Every API answers /ready through Traefik (so both consumers are attached)."""
    deadline = time.monotonic() + READY_TIMEOUT
    pending = list(HOSTS)
    while pending:
        stack.check_alive()
        pending = [h for h in pending if not answers(stack.gateway_port, h, "/ready")]
        if pending and time.monotonic() > deadline:
            raise MeasureError(f"not ready after {READY_TIMEOUT}s: {pending}")
        time.sleep(0.2)


def answers(port: int, host: str, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", path, headers={"Host": f"{host}.localhost"})
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def cleanup(stack: Stack) -> None:
    """Drop the databases, delete queues, exchange and Redis keys; each step on its own."""
    for url in (stack.person_db, stack.notifier_db):
        name = conninfo_to_dict(url)["dbname"]  # a URL listing servers has a query after it
        try:
            with psycopg.connect(DATABASE_URL, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        except psycopg.Error as exc:
            log.error("could not drop database %s: %s", name, exc)
    deadline = time.monotonic() + 90
    while True:  # the broker may be stopped for a while (fault tests on the same machine)
        try:
            with stack.channel() as channel:
                for topology in stack.topologies():
                    topology.delete(channel)
                channel.queue_delete(requests_queue(stack.exchange))
                channel.exchange_delete(exchange=stack.exchange)
            break
        except (pika.exceptions.AMQPError, OSError) as exc:
            if time.monotonic() > deadline:
                log.error("could not delete queues and exchange %s: %s", stack.exchange, exc)
                break
            time.sleep(3)
    try:
        stack.score_store().wipe()
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        log.error("could not delete Redis keys %s*: %s", stack.prefix, exc)


class BrokerWatch(threading.Thread):
    """Notes when RabbitMQ's port refuses connections: a figure measured while the broker was
    away (tests on the same machine stop it) says nothing about the stack, so it is dropped."""

    def __init__(self) -> None:
        super().__init__(name="broker-watch", daemon=True)
        params = pika.URLParameters(AMQP_URL)
        self.address = (params.host, params.port)
        self.outages: list[list[float]] = []  # [down since, back at (inf while down)]
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.25):
            try:
                socket.create_connection(self.address, timeout=1).close()
                up = True
            except OSError:
                up = False
            now = time.perf_counter()
            down = bool(self.outages) and self.outages[-1][1] == math.inf
            if not up and not down:
                self.outages.append([now, math.inf])
                log.warning("RabbitMQ at %s:%s refuses connections", *self.address)
            elif up and down:
                self.outages[-1][1] = now
                log.warning("RabbitMQ answers again")

    def away_between(self, start: float, end: float) -> bool:
        return any(since <= end and back >= start for since, back in self.outages)


class PacedWriter(threading.Thread):
    """POSTs a write every `interval` seconds through Traefik (`request(n)` gives the n-th's
    path and body) until `stopping` is set; remembers, for each acknowledged (201), when it was
    sent and answered and the answer's JSON. The failover steps write through a failure with it."""

    def __init__(
        self, stack: Stack, request: Callable[[int], tuple[str, Any]], interval: float
    ) -> None:
        super().__init__(name="paced-writer", daemon=True)
        self.stack = stack
        self.gateway = Gateway(stack.gateway_port)
        self.request, self.interval = request, interval
        self.acked: list[tuple[float, float, dict]] = []  # (sent, answered, answer)
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.wait(self.interval):
            n += 1
            path, body = self.request(n)
            sent = time.perf_counter()
            status, raw = self.gateway.post("person", path, body)
            if status == 201:
                self.acked.append((sent, time.perf_counter(), json.loads(raw)))
            else:
                self.failures.append(f"{status} {raw[:200]!r}")

    def warm_up(self, seconds: float) -> None:
        """Start writing; return after `seconds` (MeasureError if a process exits meanwhile)."""
        self.start()
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            self.stack.check_alive()
            time.sleep(0.1)

    def finish(self) -> None:
        self.stopping.set()
        self.join(10)


# -- data ------------------------------------------------------------------------------------
def cpf_of(n: int) -> str:
    """CPFs of prefilled people: 11 digits starting with 1 (other phases use other digits)."""
    return f"1{n:010d}"


def prefill(db_url: str, first: int, count: int) -> list[str]:
    """Register people first..first+count-1, each with one income and no e-mail address.

    Writes what PgStore.create_person and PgStore.add_item would write (the rows, the entity
    version counters and the outbox events, built with the person package's own state
    functions), with COPY, in one transaction: person n's events are followed by its income's.
    Without an e-mail address no welcome e-mail is due: the e-mail sender stays out of the
    replication figures (the API phases register people with one).
    """
    cpfs: list[str] = []
    with psycopg.connect(db_url) as conn, conn.cursor() as cur:
        for start in range(first, first + count, PREFILL_CHUNK):
            people, items, events = [], [], []
            for n in range(start, min(start + PREFILL_CHUNK, first + count)):
                now = datetime.now(UTC)
                person = {
                    "cpf": cpf_of(n),
                    "name": f"Person {n}",
                    "address": f"Rua da Aurora, {n % 2000 + 1}, Recife",
                    "date_of_birth": date(1950 + n % 50, 1 + n % 12, 1 + n % 28),
                    "email": None,
                    "status": "pending",
                    "created_at": now,
                    "updated_at": now,
                }
                item = {
                    "id": uuid.uuid4(),
                    "cpf": person["cpf"],
                    "kind": "income",
                    "type": "salary",
                    "value": Decimal(f"{1000 + n % 9000}.00"),
                    "created_at": now,
                }
                people.append(person)
                items.append(item)
                events.append(
                    event("person", person["cpf"], person_data(person).model_dump(mode="json"))
                )
                events.append(
                    event("income", str(item["id"]), item_data(item).model_dump(mode="json"))
                )
                cpfs.append(person["cpf"])
            copy_rows(cur, "person", people)
            copy_rows(cur, "item", items)
            copy_rows(
                cur,
                "messaging_entity_versions",
                [{"entity": e.entity, "entity_id": e.entity_id, "version": 1} for e in events],
            )
            copy_rows(
                cur,
                "messaging_outbox",
                [
                    {
                        "event_id": e.event_id,
                        "event_type": e.event_type,
                        "entity": e.entity,
                        "entity_id": e.entity_id,
                        "entity_version": e.entity_version,
                        "occurred_at": e.occurred_at,
                        "correlation_id": e.correlation_id,
                        "body": e.to_json().decode(),
                    }
                    for e in events
                ],
            )
        conn.commit()
        conn.execute("ANALYZE")
        conn.commit()
    return cpfs


def event(entity: str, entity_id: str, data: dict) -> Envelope:
    """A `created` event as Outbox.add builds it (version 1; the API's correlation id)."""
    return Envelope.new(
        event_type=f"{entity}.created",
        entity_id=entity_id,
        entity_version=1,
        data=data,
        producer=PRODUCER,
        correlation_id=str(uuid.uuid4()),
    )


def copy_rows(cur: psycopg.Cursor, table: str, rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0])
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    with cur.copy(statement) as copy:
        for row in rows:
            copy.write_row([row[c] for c in columns])


# -- catching up -----------------------------------------------------------------------------
class ReadModels:
    """Direct checks of both read models: Redis keys (score) and the users table (notifier)."""

    def __init__(self, stack: Stack) -> None:
        self.score = stack.score_store()
        self.redis = self.score.client
        self.db = psycopg.connect(stack.notifier_db, autocommit=True)

    def close(self) -> None:
        self.redis.close()
        self.db.close()

    def score_missing(self, cpfs: list[str], items: int = 1) -> list[str]:
        """CPFs whose person hash or item set is not there yet (in the order given)."""
        missing: list[str] = []
        for start in range(0, len(cpfs), 5000):
            chunk = cpfs[start : start + 5000]
            pipe = self.redis.pipeline(transaction=False)
            for cpf in chunk:
                pipe.hget(self.score.person_key(cpf), "version")
                pipe.scard(self.score.items_key(cpf))
            found = pipe.execute()
            missing += [
                cpf
                for i, cpf in enumerate(chunk)
                if found[2 * i] is None or found[2 * i + 1] < items
            ]
        return missing

    def users(self) -> int:
        return self.db.execute("SELECT count(*) FROM users WHERE NOT deleted").fetchone()[0]

    def has_user(self, cpf: str) -> bool:
        row = self.db.execute("SELECT 1 FROM users WHERE cpf = %s", (cpf,)).fetchone()
        return row is not None


def wait_caught_up(
    stack: Stack,
    models: ReadModels,
    cpfs: list[str],
    users: int | None,
    start: float,
    timeout: float,
    items: int = 1,
) -> tuple[float, float | None]:
    """Seconds from `start` until every CPF has its score keys (and `items` items) and, unless
    `users` is None, the users table holds `users` rows: (score seconds, notifier seconds).

    The CPFs are in event order and each consumer applies its queue in order, so the last CPF is
    a sentinel: checked every 10 ms alone, the whole list is only checked once it is there.
    """
    pending = list(cpfs)
    score_at: float | None = None
    notifier_at: float | None = None if users is not None else start
    while True:
        now = time.perf_counter()
        if score_at is None and not models.score_missing(pending[-1:], items):
            pending = models.score_missing(pending, items)
            if not pending:
                score_at = now
        if notifier_at is None and models.has_user(cpfs[-1]) and models.users() >= users:
            notifier_at = now
        if score_at is not None and notifier_at is not None:
            return score_at - start, (None if users is None else notifier_at - start)
        if now - start > timeout:
            raise MeasureError(
                f"not caught up after {timeout}s: {len(pending)} scores missing, "
                f"{models.users()}/{users} users"
            )
        stack.check_alive()
        time.sleep(CHECK_INTERVAL)


def settle(stack: Stack, timeout: float = SETTLE_TIMEOUT, emails: bool = True) -> None:
    """Wait until the outbox, both work queues and (unless `emails` is False) the e-mail ledger
    have nothing left to do, so that one phase's backlog does not run into the next one."""
    start = time.monotonic()
    quiet = 0
    with (
        psycopg.connect(stack.person_db, autocommit=True) as person,
        psycopg.connect(stack.notifier_db, autocommit=True) as notifier,
    ):
        while quiet < 3:
            outbox = person.execute(
                "SELECT count(*) FROM messaging_outbox WHERE published_at IS NULL"
            ).fetchone()[0]
            mails = notifier.execute(
                "SELECT count(*) FROM deliveries WHERE status IN ('pending', 'sending')"
            ).fetchone()[0]
            queued = queue_depths(stack)
            busy = outbox + (mails if emails else 0) + sum(map(abs, queued))  # -1: no broker
            quiet = quiet + 1 if busy == 0 else 0
            if time.monotonic() - start > timeout:
                log.warning(
                    "still busy after %ss (outbox %d, queues %s, e-mails %d); going on",
                    timeout,
                    outbox,
                    queued,
                    mails,
                )
                return
            stack.check_alive()
            time.sleep(0.2)
    log.info("settled in %.1fs", time.monotonic() - start)


def tidy_databases(stack: Stack) -> None:
    """VACUUM ANALYZE both databases and CHECKPOINT, untimed, between the phases: otherwise
    autovacuum and the checkpoint their 100,000s of rows call for run during the next timed
    phase, on the cores it measures. Where autovacuum is off (this machine's PostgreSQL), it
    also stands for the vacuums a server would have run meanwhile: without them the dead rows
    of the earlier phases' e-mails stay in the notifier's queue indexes, and every look for due
    e-mails walks them (the bulk import took 105 s after the other phases against 73 s
    after e2e and rebuild alone)."""
    for url in (stack.person_db, stack.notifier_db):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")
            conn.execute("CHECKPOINT")
    # An autovacuum of another database (the earlier phases') would be counted too.
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        wait_for(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
                ).fetchone()[0]
                == 0
            ),
            120,
            "autovacuum done",
            interval=0.5,
        )


def queue_depths(stack: Stack) -> list[int]:
    """Messages ready in each work queue (-1 while the broker does not answer)."""
    try:
        with stack.channel() as channel:
            return [
                channel.queue_declare(queue=t.queue, passive=True).method.message_count
                for t in stack.topologies()
            ]
    except (pika.exceptions.AMQPError, OSError):
        return [-1]


# -- e2e_events_s ----------------------------------------------------------------------------
def measure_e2e(stack: Stack, models: ReadModels, cpfs: list[str]) -> float:
    """Start the relay on the prefilled outbox; events per second until both models caught up."""
    events = 2 * len(cpfs)
    start = time.perf_counter()
    stack.start(RELAY)
    score_s, notifier_s = wait_caught_up(stack, models, cpfs, len(cpfs), start, REPLICATE_TIMEOUT)
    log.info(
        "e2e: %d events; score caught up after %.2fs (%.0f events/s), notifier after %.2fs "
        "(%.0f events/s)",
        events,
        score_s,
        events / score_s,
        notifier_s,
        events / notifier_s,
    )
    return events / max(score_s, notifier_s)


# -- rebuild_50k_s ---------------------------------------------------------------------------
def prepare_rebuild(
    stack: Stack, models: ReadModels, first: list[str], total: int = REBUILD_PEOPLE
) -> list[str]:
    """Register the people `first` lacks up to `total`, let them replicate; return them all."""
    second = timed("prefill", lambda: prefill(stack.person_db, len(first), total - len(first)))
    begin = time.perf_counter()
    score_s, _ = wait_caught_up(stack, models, second, None, begin, REPLICATE_TIMEOUT)
    log.info("replicated %d more events to the score in %.1fs", 2 * len(second), score_s)
    settle(stack)  # the notifier too
    return first + second


def measure_rebuild(stack: Stack, models: ReadModels, cpfs: list[str]) -> float:
    """The operators' rebuild (docs/operations.md), `python -m score.rebuild`: it wipes the score
    read model, the consumer asks the relay for a replay, and the command returns once the model is
    marked rebuilt; time until every score is back."""
    start = time.perf_counter()
    rebuild = subprocess.Popen(
        [sys.executable, "-m", "score.rebuild", "--timeout", str(REBUILD_TIMEOUT)],
        env=stack.env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        score_s, _ = wait_caught_up(stack, models, cpfs, None, start, REBUILD_TIMEOUT)
    finally:
        output, _ = rebuild.communicate(timeout=REBUILD_TIMEOUT)
    if rebuild.returncode != 0:
        raise MeasureError(f"score.rebuild failed ({rebuild.returncode}): {output[-2000:]}")
    log.info("rebuild: %s", output.strip())
    return score_s


# -- bulk_100k_s -----------------------------------------------------------------------------
def bulk_person(n: int) -> dict[str, Any]:
    return new_person(f"5{n:010d}", n)


def measure_bulk(stack: Stack, models: ReadModels) -> float:
    """POST /person/bulk with BULK_PEOPLE people through Traefik; seconds until the import is
    done and every one of them is in both read models (score keys and the users table)."""
    people = [bulk_person(n) for n in range(BULK_PEOPLE)]
    payload = json.dumps(people).encode()
    before = models.users()
    start = time.perf_counter()
    accepted, report = import_bulk(stack, payload, "application/json", start)
    done = time.perf_counter() - start
    if report["succeeded"] != BULK_PEOPLE:
        raise MeasureError(f"import reported {report['succeeded']} of {BULK_PEOPLE} succeeded")
    score_s, notifier_s = wait_caught_up(
        stack,
        models,
        [p["cpf"] for p in people],
        before + BULK_PEOPLE,
        start,
        REPLICATE_TIMEOUT,
        items=0,
    )
    log.info(
        "bulk: %d people, 202 after %.1fs, import done after %.1fs, score after %.1fs, "
        "notifier after %.1fs",
        BULK_PEOPLE,
        accepted,
        done,
        score_s,
        notifier_s,
    )
    return max(score_s, notifier_s)


BULK_BODY_BYTES = 32 * 1024 * 1024 - 64 * 1024  # just under BULK_MAX_BYTES


def measure_bulk_memory(stack: Stack) -> dict[str, float]:
    """POST /person/bulk with a 32 MiB NDJSON body (100,000 people whose CPF the importer
    refuses, so nothing replicates) through Traefik; then the highest peak RSS (VmHWM) of the
    person API's processes, the whole of their lives up to then."""

    def line(n: int, pad: str) -> str:
        return json.dumps(
            {"cpf": f"bulk-{n:06d}", "name": "B", "address": pad, "date_of_birth": "1990-01-01"}
        )

    pad = "x" * (BULK_BODY_BYTES // BULK_PEOPLE - len(line(0, "")) - 1)  # 1: the newline
    lines = [line(n, pad) for n in range(BULK_PEOPLE)]
    payload = "\n".join(lines).encode()
    import_bulk(stack, payload, "application/x-ndjson", time.perf_counter())
    peak = max(status_kb(pid, "VmHWM") for pid in process_tree(stack.processes["person"].pid))
    peak /= 1024
    log.info("bulk NDJSON body of %.1f MB; person API peak RSS %.0f MB", len(payload) / 2**20, peak)
    return {"bulk_body_mb": len(payload) / 2**20, "bulk_peak_rss_mb": peak}


def import_bulk(
    stack: Stack, payload: bytes, content_type: str, start: float
) -> tuple[float, dict]:
    """POST /person/bulk through Traefik and wait for the import to be done: seconds from `start`
    to the 202, and the import's report."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.gateway_port, timeout=300)
    try:
        conn.request(
            "POST",
            "/person/bulk",
            body=payload,
            headers={"Host": "person.localhost", "Content-Type": content_type},
        )
        response = conn.getresponse()
        answer = response.read()
        if response.status != 202:
            raise MeasureError(f"POST /person/bulk: {response.status} {answer[:300]!r}")
        accepted = time.perf_counter() - start
        return accepted, wait_import_done(conn, response.getheader("Location"), start)
    finally:
        conn.close()


def wait_import_done(conn: http.client.HTTPConnection, location: str, start: float) -> dict:
    while True:
        conn.request("GET", f"{location}?limit=1", headers={"Host": "person.localhost"})
        response = conn.getresponse()
        report = json.loads(response.read())
        if response.status != 200:
            raise MeasureError(f"GET {location}: {response.status} {report}")
        if report["status"] == "done":
            return report
        if time.perf_counter() - start > REPLICATE_TIMEOUT:
            raise MeasureError(f"import not done after {REPLICATE_TIMEOUT}s: {report}")
        time.sleep(0.25)


# -- latency ---------------------------------------------------------------------------------
class VisibilityPoller(threading.Thread):
    """Polls one read model for pending writes; records HTTP 201 → visible, in milliseconds.

    While a write is pending it polls every POLL_INTERVAL, all pending writes in one round trip;
    a write counts as visible at the reply of the first poll that sees it, so a sample is at most
    one poll interval plus one round trip late.
    """

    def __init__(self, name: str, check: Callable[[list[tuple]], list[bool]]) -> None:
        super().__init__(name=name, daemon=True)
        self.check = check
        self.pending: dict[tuple, float] = {}
        self.samples: list[float] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def add(self, key: tuple, acked_at: float) -> None:
        with self.lock:
            self.pending[key] = acked_at
        self.wake.set()

    def run(self) -> None:
        try:
            while not (self.stopping.is_set() and not self.pending):
                with self.lock:
                    keys = list(self.pending)
                if not keys:
                    self.wake.wait(0.05)
                    self.wake.clear()
                    continue
                found = self.check(keys)
                seen_at = time.perf_counter()
                with self.lock:
                    for key, visible in zip(keys, found, strict=True):
                        if visible:
                            acked_at = self.pending.pop(key)
                            self.samples.append((seen_at - acked_at) * 1000)
                time.sleep(POLL_INTERVAL)
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float) -> int:
        """Stop once nothing is pending or after `timeout`; return how many never showed up."""
        self.stopping.set()
        self.wake.set()
        self.join(timeout)
        if self.is_alive():
            with self.lock:
                missing = len(self.pending)
                self.pending.clear()
            self.join(5)
            return missing
        if self.error is not None:
            raise MeasureError(f"{self.name} failed: {self.error!r}")
        return 0


def at_rate(figures: dict[str, float], rate: float) -> dict[str, float]:
    """The figures named for the rate they were measured at: `<name>_at_<rate>`."""
    return {f"{name}_at_{rate:.0f}": value for name, value in figures.items()}


def measure_latency(stack: Stack, known: list[str], rate: float = LATENCY_RATE) -> dict[str, float]:
    """`rate` writes/s for LATENCY_SECONDS through Traefik, alternating a registration and an
    income of a known person; per write, HTTP 201 → visible in Redis and in `users`. The figures
    of another rate than LATENCY_RATE are named `<figure>_at_<rate>`."""
    store = stack.score_store()
    client = store.client
    notifier_db = psycopg.connect(stack.notifier_db, autocommit=True)

    def in_redis(keys: list[tuple]) -> list[bool]:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            if key[0] == "person":
                pipe.hexists(store.person_key(key[1]), "version")
            else:
                pipe.sismember(store.items_key(key[1]), key[2])
        return [bool(v) for v in pipe.execute()]

    def in_users(keys: list[tuple]) -> list[bool]:
        rows = notifier_db.execute(
            "SELECT cpf FROM users WHERE cpf = ANY(%s)", ([k[1] for k in keys],)
        ).fetchall()
        there = {row[0] for row in rows}
        return [k[1] in there for k in keys]

    score = VisibilityPoller("score-poller", in_redis)
    notifier = VisibilityPoller("notifier-poller", in_users)
    gateway = Gateway(stack.gateway_port)
    total = int(rate * LATENCY_SECONDS)
    counter = iter(range(total))
    phase = next(POST_PHASES)  # two latency runs in one process register different CPFs
    lock = threading.Lock()
    issued: list[int] = []
    failures: list[str] = []
    rng = random.Random(8)
    start = time.perf_counter() + 0.2
    stop_at = start + LATENCY_SECONDS  # when the stack cannot keep the rate, fewer writes
    late = [0.0]

    def writer() -> None:
        while True:
            with lock:
                i = next(counter, None)
                if i is None or time.perf_counter() > stop_at:
                    return
                issued.append(i)
                cpf = f"3{phase:02d}{i:08d}" if i % 2 == 0 else rng.choice(known)
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                late[0] = max(late[0], -delay)
            try:
                if i % 2 == 0:
                    status, body = gateway.post("person", "/person", new_person(cpf, i))
                    acked_at = time.perf_counter()
                    if status == 201:
                        score.add(("person", cpf), acked_at)
                        notifier.add(("person", cpf), acked_at)
                else:
                    income = {"type": "bonus", "value": f"{100 + i}.50"}
                    status, body = gateway.post("person", f"/person/{cpf}/income", income)
                    acked_at = time.perf_counter()
                    if status == 201:
                        score.add(("item", cpf, json.loads(body)["id"]), acked_at)
                if status != 201:
                    failures.append(f"{status} {body[:200]!r}")
            except (OSError, http.client.HTTPException) as exc:
                failures.append(repr(exc))

    score.start()
    notifier.start()
    threads = [threading.Thread(target=writer) for _ in range(LATENCY_WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    missing = {"score": score.finish(VISIBLE_TIMEOUT), "notifier": notifier.finish(VISIBLE_TIMEOUT)}
    client.close()
    notifier_db.close()
    done = len(issued)
    log.info(
        "latency at %.0f/s: %d writes in %.1fs (%.0f/s; the last one started %.0f ms behind "
        "schedule); %d score and %d notifier samples",
        rate,
        done,
        elapsed,
        done / elapsed,
        late[0] * 1000,
        len(score.samples),
        len(notifier.samples),
    )
    if done < total:
        log.warning(
            "latency: the stack took %d of the %d writes planned in %.0fs",
            done,
            total,
            LATENCY_SECONDS,
        )
    if failures:
        log.warning("latency: %d writes failed, e.g. %s", len(failures), failures[0])
    if len(failures) > done // 100:
        raise MeasureError(f"{len(failures)} of {done} writes failed, e.g. {failures[0]}")
    if any(missing.values()):
        raise MeasureError(f"writes never visible after {VISIBLE_TIMEOUT}s: {missing}")
    if not notifier.samples:
        raise MeasureError("no registration went through")
    figures = {
        "latency_writes_s": done / elapsed,
        "latency_score_p50_ms": percentile(score.samples, 50),
        "latency_score_p99_ms": percentile(score.samples, 99),
        "latency_notifier_p50_ms": percentile(notifier.samples, 50),
        "latency_notifier_p99_ms": percentile(notifier.samples, 99),
    }
    return figures if rate == LATENCY_RATE else at_rate(figures, rate)


def new_person(cpf: str, n: int) -> dict[str, Any]:
    return {
        "cpf": cpf,
        "name": f"Bench Person {n}",
        "address": f"Rua da Aurora, {n % 2000 + 1}, Recife",
        "date_of_birth": "1990-04-12",
        "email": f"p{cpf}@bench.example",
    }


# -- what a registration costs; POST /person open loop and at saturation ----------------------
def measure_cost(stack: Stack, rate: float = COST_RATE) -> dict[str, float]:
    """`rate` registrations a second, each with an e-mail, for COST_SECONDS, open loop through
    Traefik: the latency of each from its due time, and the CPU every process of the stack spent
    from the first request until every welcome e-mail is sent, per registration. Unsuffixed
    names; cost_figures() names them for the curve."""
    phase = next(POST_PHASES)
    prefix = f"6{phase:02d}"  # 5 is the bulk import's
    bodies = [new_person(f"{prefix}{n:08d}", n) for n in range(int(rate * COST_SECONDS))]
    meter = CpuMeter(stack)
    before = meter.snapshot()
    latencies, failures = open_loop(stack.gateway_port, "person", "/person", bodies, rate)
    if failures > len(bodies) // 100:
        raise MeasureError(f"{failures} of {len(bodies)} registrations failed")
    with psycopg.connect(stack.notifier_db, autocommit=True) as notifier:

        def sent() -> bool:
            stack.check_alive()
            return notifier.execute(
                "SELECT count(*) FROM deliveries WHERE kind = 'welcome' AND status = 'sent' "
                "AND cpf LIKE %s",
                (f"{prefix}%",),
            ).fetchone()[0] >= len(latencies)

        wait_for(sent, SETTLE_TIMEOUT, "every welcome e-mail sent")
    spent = CpuMeter.spent(before, meter.snapshot())
    log.info(
        "cost at %.0f/s: %d registrations, CPU seconds %s",
        rate,
        len(latencies),
        ", ".join(f"{k} {v:.2f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])),
    )
    figures = {
        "post_person_p50_ms": percentile(latencies, 50),
        "post_person_p99_ms": percentile(latencies, 99),
        "cpu_ms_per_registration": sum(spent.values()) * 1000 / len(latencies),
    }
    for name, seconds in sorted(spent.items()):
        figures[f"cpu_ms_per_registration_{name.replace('-', '_')}"] = (
            seconds * 1000 / len(latencies)
        )
    return figures


def cost_figures(measured: dict[str, float], rate: float) -> dict[str, float]:
    """One point of the cost curve: `cpu_ms_per_registration_at_<rate>` and the POST latency
    at that rate (`post_person_p50_ms_at_<rate>`, `post_person_p99_ms_at_<rate>`); at COST_RATE
    also the unsuffixed `cpu_ms_per_registration` and its parts per process, at POST_P99_RATE
    the unsuffixed POST latency."""
    main = ("cpu_ms_per_registration", "post_person_p50_ms", "post_person_p99_ms")
    figures = at_rate({name: measured[name] for name in main}, rate)
    if rate == COST_RATE:
        figures.update(
            {k: v for k, v in measured.items() if k.startswith("cpu_ms_per_registration")}
        )
    if rate == POST_P99_RATE:
        figures.update({k: measured[k] for k in ("post_person_p50_ms", "post_person_p99_ms")})
    return figures


def measure_post(stack: Stack) -> dict[str, float]:
    """POST /person through Traefik at saturation: wrk, POST_CLIENTS connections, POST_SECONDS."""
    got = wrk_post(
        stack.gateway_port, f"4{next(POST_PHASES):02d}", stack.log_dir, POST_CLIENTS, POST_SECONDS
    )
    return {"post_person_rps": got["rps"], "post_person_saturated_p99_ms": got["p99_ms"]}


def measure_alone_figures() -> dict[str, float]:
    """The ceiling and the naive design, each alone behind the stack's Traefik."""
    env = stack_environment(f"alone-{uuid.uuid4().hex[:6]}")
    return {
        f"post_{kind}_rps": measure_alone(kind, env, DATABASE_URL, POST_CLIENTS, POST_SECONDS)
        for kind in ("ceiling", "naive")
    }


# -- memory ----------------------------------------------------------------------------------
def children() -> dict[int, list[int]]:
    """Parent pid → child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(root: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    """A process and all its descendants (a gunicorn master and its workers)."""
    tree = children() if tree is None else tree
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += tree.get(pid, [])
    return pids


def status_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (for the log: where the run's time went)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_memory(stack: Stack) -> dict[str, float]:
    """VmRSS of each process of the stack (a gunicorn master or any of its workers): the
    largest per Procfile entry, and the largest of all."""
    tree = children()
    figures: dict[str, float] = {}
    for name, process in stack.processes.items():
        if process.poll() is not None:
            raise MeasureError(f"{name} is not running")
        pids = process_tree(process.pid, tree)
        rss = {pid: status_kb(pid, "VmRSS") / 1024 for pid in pids}
        peak = {pid: status_kb(pid, "VmHWM") / 1024 for pid in pids}
        log.info(
            "%s: %s",
            name,
            ", ".join(
                f"pid {p} {rss[p]:.0f} MB (peak {peak[p]:.0f} MB, {cpu_seconds(p):.0f} s CPU)"
                for p in pids
            ),
        )
        figures[f"rss_{name.replace('-', '_').replace('.', '_')}_mb"] = max(rss.values())
    figures["max_rss_mb"] = max(figures.values())
    return figures


# -- driver ----------------------------------------------------------------------------------
NAMES = {  # the figures each step must print
    "e2e": ("e2e_events_s",),
    "rebuild": ("rebuild_50k_s",),
    "latency": tuple(
        f"{name}{'' if rate == LATENCY_RATE else f'_at_{rate:.0f}'}"
        for rate in LATENCY_RATES
        for name in (
            "latency_score_p50_ms",
            "latency_score_p99_ms",
            "latency_notifier_p50_ms",
            "latency_notifier_p99_ms",
        )
    ),
    "alone": ("post_ceiling_rps", "post_naive_rps"),
    "cost": (
        "cpu_ms_per_registration",
        "post_person_p50_ms",
        "post_person_p99_ms",
        *(f"cpu_ms_per_registration_at_{rate:.0f}" for rate in COST_RATES),
        *(f"post_person_p99_ms_at_{rate:.0f}" for rate in COST_RATES),
    ),
    "post": ("post_person_rps", "post_person_saturated_p99_ms"),
    "bulk": ("bulk_100k_s",),
    "bulkmem": ("bulk_peak_rss_mb",),
    "memory": ("max_rss_mb",),
}


def show(name: str, value: float) -> None:
    """Rates and megabytes as integers, milliseconds and the rebuild's seconds to 0.1, a
    stall's seconds, CPU milliseconds and the POST ratio to 0.01 (`_at_<rate>` aside)."""
    base = re.sub(r"_at_\d+$", "", name)
    decimals = 1 if base.endswith("_ms") or name in ("rebuild_50k_s", "bulk_100k_s") else 0
    if name.endswith("_stall_s") or name.startswith("cpu_ms") or name == "post_vs_ceiling":
        decimals = 2
    print(f"{name}: {value:.{decimals}f}", flush=True)


def measure(
    figures: dict[str, float],
    step: Callable[[], dict[str, float] | float],
    name: str,
    watch: BrokerWatch,
) -> None:
    """Run one step, print its figure(s), or log why they could not be measured."""
    started = time.monotonic()
    begin = time.perf_counter()
    try:
        got = step()
    except Exception as exc:
        log.error("%s: not measured (%s: %s)", name, type(exc).__name__, exc)
        return
    if watch.away_between(begin, time.perf_counter()):
        log.error("%s: not measured (RabbitMQ was away meanwhile; run again)", name)
        return
    got = got if isinstance(got, dict) else {name: got}
    for key, value in got.items():
        figures[key] = value
        show(key, value)
    log.info("%s took %.1fs", name, time.monotonic() - started)


STEPS = ("alone", "e2e", "rebuild", "latency", "cost", "post", "bulk", "bulkmem", "memory")


def run(steps: tuple[str, ...] = STEPS) -> dict[str, float]:
    """Measure every figure (or those of `steps`) on one stack of this run's own."""
    run_id = uuid.uuid4().hex[:8]
    figures: dict[str, float] = {}
    started = time.monotonic()
    watch = BrokerWatch()
    watch.start()
    if "alone" in steps:  # before the stack starts: nothing else of it runs
        measure(figures, measure_alone_figures, "post_alone", watch)
    with running_stack(run_id) as stack:
        log.info("stack up in %.1fs (logs in %s)", time.monotonic() - started, stack.log_dir)
        models = ReadModels(stack)
        try:
            people: list[str] = []
            if "e2e" in steps:
                people = timed("prefill", lambda: prefill(stack.person_db, 0, E2E_PEOPLE))
                measure(figures, lambda: measure_e2e(stack, models, people), "e2e_events_s", watch)
            if not set(stack.copies(RELAY)) & set(stack.processes):
                stack.start(RELAY)
            settle(stack)
            if "rebuild" in steps:

                def rebuild() -> float:
                    nonlocal people
                    people = prepare_rebuild(stack, models, people)
                    return measure_rebuild(stack, models, people)

                measure(figures, rebuild, "rebuild_50k_s", watch)
                settle(stack)
            if "latency" in steps:
                if not people:
                    people = prepare_rebuild(stack, models, [], LATENCY_PEOPLE)
                for rate in LATENCY_RATES:
                    timed("vacuum and checkpoint", lambda: tidy_databases(stack))
                    measure(
                        figures,
                        lambda r=rate: measure_latency(stack, people, r),
                        f"latency at {rate:.0f}/s",
                        watch,
                    )
                    settle(stack)
            if "cost" in steps:
                for rate in COST_RATES:
                    timed("vacuum and checkpoint", lambda: tidy_databases(stack))
                    measure(
                        figures,
                        lambda r=rate: cost_figures(measure_cost(stack, r), r),
                        f"cost at {rate:.0f}/s",
                        watch,
                    )
                    settle(stack)
            if "post" in steps:
                measure(figures, lambda: measure_post(stack), "post_person", watch)
                settle(stack, emails=False)
            if "bulk" in steps:
                timed("vacuum and checkpoint", lambda: tidy_databases(stack))
                measure(figures, lambda: measure_bulk(stack, models), "bulk_100k_s", watch)
            if "bulkmem" in steps:
                measure(figures, lambda: measure_bulk_memory(stack), "bulk_peak_rss_mb", watch)
            if "memory" in steps:
                measure(figures, lambda: measure_memory(stack), "max_rss_mb", watch)
        finally:
            models.close()
    watch.stopping.set()
    if "post_person_rps" in figures and "post_ceiling_rps" in figures:
        figures["post_vs_ceiling"] = figures["post_person_rps"] / figures["post_ceiling_rps"]
        show("post_vs_ceiling", figures["post_vs_ceiling"])
    log.info("stack benchmark took %.0fs", time.monotonic() - started)
    return figures


def timed(what: str, step: Callable[[], Any]) -> Any:
    started = time.monotonic()
    result = step()
    log.info("%s took %.1fs", what, time.monotonic() - started)
    return result


def interrupted(signum: int, _frame: Any) -> None:
    """SIGTERM handler: raise KeyboardInterrupt, so every clean-up runs."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None, figures: dict[str, float] | None = None) -> int:
    """Run the stack benchmark; 1 if any figure went unmeasured. `figures`, if given, receives
    what was measured (bench.py shows the cluster's figures beside them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        default=",".join(STEPS),
        help=f"comma-separated steps to run (default: all of {','.join(STEPS)})",
    )
    args = parser.parse_args(argv)
    steps = tuple(step for step in args.steps.split(",") if step)
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown step(s): {', '.join(sorted(unknown))}")
    if {"alone", "post"} & set(steps):
        need_wrk()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.setLevel(logging.INFO)  # also when relay_bench configured logging first (bench.py)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # failures surface as exceptions

    signal.signal(signal.SIGTERM, interrupted)  # run the clean-ups, as on Ctrl-C
    try:
        measured = run(steps)
    except (Exception, KeyboardInterrupt) as exc:
        log.error("stack benchmark aborted: %s: %s", type(exc).__name__, exc)
        return 1
    if figures is not None:
        figures.update(measured)
    missing = [name for step in steps for name in NAMES[step] if name not in measured]
    if missing:
        log.error("not measured: %s", ", ".join(missing))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
