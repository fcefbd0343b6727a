"""pg_failover_stall_s: how long losing the person database's primary stalls replication.

Run: .venv/bin/python bench/pg_failover_bench.py. Prints `pg_failover_stall_s: <seconds>` (see
bench/README.md), logs to stderr, exits non-zero only if the figure could not be measured; where
PostgreSQL's server binaries are missing (no initdb) it prints why it skipped and exits 0.

A primary and a synchronous standby of its own (stack/pg_pair.py: initdb and pg_basebackup as
the `postgres` user on free ports, in a temporary directory, removed afterwards) hold the person
and notifier databases; stack_bench.py's stack runs on them, with PERSON_DATABASE_URL and
NOTIFIER_DATABASE_URL naming both servers (target_session_attrs=read-write) and two relays (one
active, one standby), as the Kubernetes manifests run it. A person is registered every 20 ms
through Traefik; after 3 s the primary is killed (`pg_ctl stop -m immediate`) and the standby
promoted at once, as a failover manager does once it has decided: the figure is the seconds from
the start of the kill until a registration sent once the primary was dead is in the score read
model.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import uuid

import psycopg
from stack.pg_pair import PgPair, available
from stack_bench import (
    RELAY,
    MeasureError,
    PacedWriter,
    ReadModels,
    Stack,
    new_person,
    running_stack,
    settle,
    show,
)

NAME = "pg_failover_stall_s"
WRITE_INTERVAL = 0.02
STEADY_SECONDS = 3.0
STALL_TIMEOUT = 120.0
POLL_INTERVAL = 0.005

log = logging.getLogger("bench.pg_failover")


def sent_after(writer: PacedWriter, moment: float) -> list[str]:
    """CPFs of the registrations sent after `moment` and acknowledged, in order."""
    return [answer["cpf"] for sent, _, answer in list(writer.acked) if sent > moment]


def measure_failover(stack: Stack, pair: PgPair, models: ReadModels) -> float:
    writer = PacedWriter(
        stack, lambda n: ("/person", new_person(f"{88_800_000_000 + n}", n)), WRITE_INTERVAL
    )
    try:
        writer.warm_up(STEADY_SECONDS)
        before = sent_after(writer, 0)
        if not before or models.score_missing(before[:1], items=0):
            raise MeasureError("registrations were not replicating before the kill")
        killed_at = time.perf_counter()
        pair.kill_primary()
        # pg_ctl returns once the primary is gone: what is sent from now on can only be the new
        # primary's (a request sent while pg_ctl was stopping it may have committed there).
        dead_at, dead_wall = time.perf_counter(), time.time()
        pair.promote()
        log.info(
            "primary dead %.2fs after the kill began, standby promoted after %.2fs",
            dead_at - killed_at,
            time.perf_counter() - killed_at,
        )
        acked_at = None
        while True:
            later = sent_after(writer, dead_at)
            if later and acked_at is None:
                acked_at = time.perf_counter() - killed_at
            if later and len(models.score_missing(later, items=0)) < len(later):
                stall = time.perf_counter() - killed_at
                break
            if time.perf_counter() - killed_at > STALL_TIMEOUT:
                raise MeasureError(f"nothing sent after the kill applied in {STALL_TIMEOUT}s")
            time.sleep(POLL_INTERVAL)
        published = first_published_after(stack, dead_wall)  # where the stall was
        log.info(
            "first registration sent after the primary's death acknowledged %.2fs after the kill "
            "began, in the score after %.2fs; the first event made after the death published "
            "%ss after it",
            acked_at,
            stall,
            f"{published:.2f}" if published is not None else "?",
        )
    finally:
        writer.finish()
    if writer.failures:
        failed = len(writer.failures)
        log.info("%d registrations failed during the failover, e.g. %s", failed, writer.failures[0])
    return stall


def first_published_after(stack: Stack, moment: float) -> float | None:
    """Seconds from `moment` (wall clock) until the relay marked the first event written after
    it published (its mark trails the publish by a few milliseconds: waited for, up to 5 s)."""
    deadline = time.monotonic() + 5
    with psycopg.connect(stack.person_db, autocommit=True) as conn:
        while True:
            published = conn.execute(
                "SELECT extract(epoch FROM min(published_at)) - %s FROM messaging_outbox "
                "WHERE occurred_at > to_timestamp(%s)",
                (moment, moment),
            ).fetchone()[0]
            if published is not None or time.monotonic() > deadline:
                return None if published is None else float(published)
            time.sleep(0.05)


def run() -> float:
    run_id = uuid.uuid4().hex[:8]
    with PgPair() as pair:
        overrides = {
            "PERSON_DATABASE_URL": pair.url(f"bench_person_{run_id}"),
            "NOTIFIER_DATABASE_URL": pair.url(f"bench_notifier_{run_id}"),
            "PERSON_RELAYS": "2",
        }
        with running_stack(run_id, overrides) as stack:
            stack.start(RELAY)
            settle(stack)
            models = ReadModels(stack)
            try:
                return measure_failover(stack, pair, models)
            finally:
                models.close()


def interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    why = available()
    if why is not None:
        print(f"{NAME}: skipped ({why})", flush=True)
        return 0
    signal.signal(signal.SIGTERM, interrupted)
    try:
        stall = run()
    except (Exception, KeyboardInterrupt) as exc:
        log.error("%s: not measured (%s: %s)", NAME, type(exc).__name__, exc)
        return 1
    show(NAME, stall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
