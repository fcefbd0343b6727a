"""A registration's cost in the person store alone: round trips, wall time and client CPU.

Run: .venv/bin/python bench/registration_bench.py [--people N]. Prints
`registration_round_trips`, `registration_ms` and `registration_cpu_ms` (bench/README.md); logs
on stderr.

N people are registered one after the other through `PgStore.create_person` (what `POST /person`
calls) on a fresh database `bench_registration_<id>` of the local server (BENCH_DATABASE_URL),
over a pool of one connection whose libpq trace counts the messages that end a round trip
(`Sync` of the extended protocol, `Query` of the simple one). A first 50 registrations are not
timed (connection, prepared statements). The database is dropped afterwards.
"""

from __future__ import annotations

import argparse
import logging
import re
import resource
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

from person.migrate import migrate_database
from person.store import PgStore
from psycopg_pool import ConnectionPool
from relay_bench import fresh_database

log = logging.getLogger("registration_bench")

PEOPLE = 2000
WARM_UP = 50
_ENDS_A_ROUND_TRIP = re.compile(r"\tF\t\d+\t(Sync|Query)\b")


def fields(n: int) -> dict:
    return {
        "cpf": f"{n:011d}",
        "name": f"Bench Person {n}",
        "address": "Rua da Aurora, 1, Recife",
        "date_of_birth": date(1990, 1, 1),
        "email": f"p{n}@bench.example",
    }


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(people: int) -> dict[str, float]:
    run_id = uuid.uuid4().hex[:10]
    with (
        tempfile.TemporaryDirectory(prefix=f"registration-bench-{run_id}-") as tmp,
        fresh_database(f"bench_registration_{run_id}") as db_url,
    ):
        migrate_database(db_url)
        trace = Path(tmp) / "libpq.trace"
        with (
            trace.open("w") as out,
            ConnectionPool(db_url, min_size=1, max_size=1, open=True) as pool,
        ):
            store = PgStore(pool)
            for n in range(WARM_UP):
                store.create_person(fields(n), None)
            with pool.connection() as conn:
                conn.pgconn.trace(out.fileno())
            began, cpu_began = time.perf_counter(), cpu()
            for n in range(WARM_UP, WARM_UP + people):
                store.create_person(fields(n), f"bench-{n}")
            elapsed, cpu_used = time.perf_counter() - began, cpu() - cpu_began
            with pool.connection() as conn:
                conn.pgconn.untrace()
        round_trips = sum(1 for line in trace.open() if _ENDS_A_ROUND_TRIP.search(line))
    return {
        "registration_round_trips": round_trips / people,
        "registration_ms": elapsed * 1000 / people,
        "registration_cpu_ms": cpu_used * 1000 / people,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=PEOPLE, help=f"default {PEOPLE}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    figures = measure(args.people)
    print(f"registration_round_trips: {figures['registration_round_trips']:.2f}", flush=True)
    print(f"registration_ms: {figures['registration_ms']:.3f}", flush=True)
    print(f"registration_cpu_ms: {figures['registration_cpu_ms']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
