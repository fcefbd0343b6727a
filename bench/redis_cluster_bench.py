"""Figures of the score on a Redis Cluster of its own, beside the single Redis of the rest.

Run: .venv/bin/python bench/redis_cluster_bench.py [--single] [--entities N]. Prints one
`name: value` line per figure (see bench/README.md), logs to stderr, and exits non-zero only if a
figure could not be measured. `make bench` runs it after cluster_bench.py and prints the ratio to
that run's single-Redis `e2e_events_s`; `--single` measures that figure first, for the same
comparison when this step runs alone. Where redis-server is not installed it prints
`<figure>: skipped (<why>)` for each figure and exits 0.

The cluster is three masters with a replica each (stack/redis_cluster.py: Debian's redis-server
on free ports, in a temporary directory), started here and removed afterwards, also when a step
fails. The stack is stack_bench.py's with SCORE_REDIS_URL naming the six nodes; the broker, the
databases and everything else are the single servers of stack_bench.py.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import time
import uuid

import stack_bench
import verify_bench
from cluster_bench import interrupted, measure, stall_after
from messaging.stores import redis_client
from stack.redis_cluster import LocalRedisCluster
from stack_bench import (
    E2E_PEOPLE,
    ReadModels,
    Stack,
    measure_e2e,
    prefill,
    running_stack,
    settle,
    timed,
)

POLL_INTERVAL = 0.005
FIGURES = ("redis_cluster_e2e_events_s", "redis_failover_stall_s", "redis_cluster_verify_ms")

log = logging.getLogger("bench.redis_cluster")


def measure_stall(stack: Stack, cluster: LocalRedisCluster) -> float:
    """SIGKILL the master that serves one person's keys while an income is added to that person
    every 20 ms; seconds from the kill until an income written after it is in the score read
    model (the master's replica takes over once the others have not heard from it for
    stack.redis_cluster.NODE_TIMEOUT_MS; the consumers pause, then go on)."""
    cpf = "77700000002"
    store = stack.score_store()
    victim = cluster.master_of(store.person_key(cpf))
    store.client.close()

    def kill() -> None:
        cluster.kill(victim)
        log.info("failover: SIGKILLed the master on %d, which serves %s", victim, cpf)

    stall = stall_after(stack, cpf, 2, kill)
    log.info("failover: the score applied a write made after the kill %.2fs after it", stall)
    timed("bringing the killed node back as a replica", cluster.heal)
    return stall


def measure_verify(cluster: LocalRedisCluster, entities: int) -> float:
    """verify_bench.py's score check, on the cluster: `entities` people, one digest of them."""
    client, prefix = redis_client(cluster.url), f"bench-verify-{uuid.uuid4().hex[:8]}:"
    try:
        return verify_bench.score_check_ms(client, prefix, entities)
    finally:
        client.close()


def run(entities: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    started = time.monotonic()
    with LocalRedisCluster() as cluster:
        log.info("Redis Cluster up in %.1fs: %s", time.monotonic() - started, cluster.url)
        with running_stack(uuid.uuid4().hex[:8], {"SCORE_REDIS_URL": cluster.url}) as stack:
            models = ReadModels(stack)
            try:
                people = timed("prefill", lambda: prefill(stack.person_db, 0, E2E_PEOPLE))
                measure(
                    figures,
                    lambda: measure_e2e(stack, models, people),
                    "redis_cluster_e2e_events_s",
                )
                settle(stack)
                measure(figures, lambda: measure_stall(stack, cluster), "redis_failover_stall_s")
            finally:
                models.close()
        stack_bench.show("redis_cluster_verify_entities", entities)
        measure(figures, lambda: measure_verify(cluster, entities), "redis_cluster_verify_ms")
    log.info("Redis Cluster benchmark took %.0fs", time.monotonic() - started)
    return figures


def main(argv: list[str] | None = None, single_e2e: float | None = None) -> int:
    """Run the Redis Cluster benchmark; 1 if a figure went unmeasured. With the single-Redis
    `e2e_events_s` of the same run (bench.py, or --single), also their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--single", action="store_true", help="measure the single-Redis e2e_events_s first"
    )
    parser.add_argument(
        "--entities", type=int, default=1_000_000, help="people of the verification (1000000)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        why = "redis-server is not installed: Debian package redis-server"
        for name in ("redis_cluster_e2e_ratio", *FIGURES):
            print(f"{name}: skipped ({why})", flush=True)
        return 0
    signal.signal(signal.SIGTERM, interrupted)
    if args.single:
        single: dict[str, float] = {}
        if stack_bench.main(["--steps", "e2e"], figures=single) == 0:
            single_e2e = single["e2e_events_s"]
    try:
        figures = run(args.entities)
    except (Exception, KeyboardInterrupt) as exc:
        log.error("Redis Cluster benchmark aborted: %s: %s", type(exc).__name__, exc)
        return 1
    if single_e2e and "redis_cluster_e2e_events_s" in figures:
        ratio = figures["redis_cluster_e2e_events_s"] / single_e2e
        print(f"redis_cluster_e2e_ratio: {ratio:.2f}", flush=True)
    missing = set(FIGURES) - set(figures)
    if missing:
        log.error("not measured: %s", ", ".join(sorted(missing)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
