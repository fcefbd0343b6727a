"""What the relay asks PostgreSQL per event below its ceiling: fetches and CPU per event.

Run: .venv/bin/python bench/relay_fetch_bench.py [--events N] [--rate R]. Prints
`relay_fetches_per_event`, `relay_marks_per_event` and `relay_cpu_ms_per_event`
(bench/README.md); logs on stderr.

A relay (in this process, on its own threads) publishes to a fanout exchange bound to a quorum
queue (`bench-fetch-<id>`, deleted afterwards) from a fresh database `bench_fetch_<id>`, while
N events are written one per transaction at R per second (default 200/s, well below the relay's
ceiling, as a live API writes). Fetches are the relay's executions of its FETCH statement
(counted by wrapping psycopg's Connection.execute in this process), and
`relay_empty_fetches_per_event` those that returned no row. The CPU is this process's (relay
and writer) per event, the writer's share measured alone beforehand and taken off.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
import uuid

import psycopg
from messaging import Outbox, Relay, RelaySettings
from messaging import relay as relay_module
from messaging.outbox import install
from messaging.testing import running, wait_until
from relay_bench import AMQP_URL, fanout_to_quorum, fresh_database

log = logging.getLogger("relay_fetch_bench")

EVENTS, RATE = 2000, 200.0


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_paced(conn: psycopg.Connection, outbox: Outbox, first: int, n: int, rate: float) -> None:
    began = time.monotonic()
    for i in range(n):
        with conn.transaction(), conn.cursor() as cur:
            outbox.add(cur, event_type="thing.updated", entity_id=f"e{first + i}", data={"i": i})
        ahead = began + (i + 1) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)  # pacing the writer to its rate, not waiting for a result


class FetchCounter:
    """Counts the relay's FETCH statements, those that returned no row, and its MARK statements
    (each a transaction of its own with the marking lock: what PostgreSQL does per mark)."""

    def __init__(self) -> None:
        self.fetches = self.empty = self.marks = 0
        self.real = psycopg.Connection.execute

    def __enter__(self) -> FetchCounter:
        counter, real = self, self.real

        def execute(conn, query, *args, **kwargs):
            cur = real(conn, query, *args, **kwargs)
            if query is relay_module.FETCH_SQL:
                counter.fetches += 1
                counter.empty += cur.rowcount == 0
            elif query is relay_module.MARK_SQL:
                counter.marks += 1
            return cur

        psycopg.Connection.execute = execute
        return self

    def __exit__(self, *exc: object) -> None:
        psycopg.Connection.execute = self.real


def unpublished(conn: psycopg.Connection) -> int:
    return conn.execute(
        "SELECT count(*) FROM messaging_outbox WHERE published_at IS NULL"
    ).fetchone()[0]


def measure(n: int, rate: float) -> dict[str, float]:
    run_id = uuid.uuid4().hex[:10]
    with (
        fresh_database(f"bench_fetch_{run_id}") as db_url,
        fanout_to_quorum(f"bench-fetch-{run_id}") as exchange,
        psycopg.connect(db_url, autocommit=True) as watch,
        psycopg.connect(db_url) as conn,
    ):
        install(watch)
        outbox = Outbox("bench")
        cpu_began = cpu()
        write_paced(conn, outbox, 0, n, rate)  # the writer alone, for its share of the CPU
        writer_cpu = cpu() - cpu_began
        watch.execute("UPDATE messaging_outbox SET published_at = now()")
        relay = Relay(RelaySettings(database_url=db_url, amqp_url=AMQP_URL, exchange=exchange))
        cpu_began = cpu()
        with FetchCounter() as counter, running(relay):
            write_paced(conn, outbox, n, n, rate)
            wait_until(lambda: unpublished(watch) == 0, timeout=60, what="all rows marked")
        relay_cpu = cpu() - cpu_began - writer_cpu
    return {
        "relay_fetches_per_event": counter.fetches / n,
        "relay_empty_fetches_per_event": counter.empty / n,
        "relay_marks_per_event": counter.marks / n,
        "relay_cpu_ms_per_event": relay_cpu * 1000 / n,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=EVENTS, help=f"default {EVENTS}")
    parser.add_argument("--rate", type=float, default=RATE, help=f"default {RATE:.0f}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    figures = measure(args.events, args.rate)
    print(f"relay_fetches_per_event: {figures['relay_fetches_per_event']:.2f}", flush=True)
    print(f"relay_empty_fetches_per_event: {figures['relay_empty_fetches_per_event']:.2f}")
    print(f"relay_marks_per_event: {figures['relay_marks_per_event']:.2f}")
    print(f"relay_cpu_ms_per_event: {figures['relay_cpu_ms_per_event']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
