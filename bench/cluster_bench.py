"""Figures of the stack with replicas on a three-node RabbitMQ cluster of its own.

Run: .venv/bin/python bench/cluster_bench.py [--single]. Prints one `name: value` line per
figure (see bench/README.md), logs to stderr, and exits non-zero only if a figure could not be
measured. `make bench` runs it after stack_bench.py and prints the ratio to that run's
single-node `e2e_events_s`; `--single` measures that figure first, for the same comparison
when this step runs alone.

The cluster is c1..c3@localhost (stack/cluster.py), started here and removed afterwards with
everything of the stack (its databases, queues, Redis keys), also when a step fails. The stack is
stack_bench.py's, with AMQP_URL listing the three nodes (c1 first), every queue a member on each
node, and the copies of the cluster fault run: 3 score consumers, 2 notifier consumers, 2 senders
and 2 relays (one active, one standby).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import redis
import stack_bench
from stack.cluster import Cluster
from stack.processes import Gateway
from stack_bench import (
    E2E_PEOPLE,
    RELAY,
    MeasureError,
    PacedWriter,
    ReadModels,
    Stack,
    children,
    cpu_seconds,
    measure_e2e,
    new_person,
    prefill,
    running_stack,
    settle,
    show,
    timed,
)

COPIES = {
    "SCORE_CONSUMERS": "3",
    "NOTIFIER_CONSUMERS": "2",
    "NOTIFIER_SENDERS": "2",
    "PERSON_RELAYS": "2",
}
WRITE_INTERVAL = 0.02  # one income every 20 ms during the failover step
STEADY_SECONDS = 3.0  # writes before the kill
STALL_TIMEOUT = 120.0
POLL_INTERVAL = 0.005

log = logging.getLogger("bench.cluster")


def cluster_overrides(cluster: Cluster) -> dict[str, str]:
    return {"AMQP_URL": cluster.amqp_url, "QUEUE_GROUP_SIZE": "3", **COPIES}


# -- failover_stall_s ------------------------------------------------------------------------
def answered_after(writer: PacedWriter, moment: float) -> list[str]:
    """Ids of the incomes acknowledged after `moment`, in order."""
    return [answer["id"] for _, answered, answer in list(writer.acked) if answered > moment]


def stall_after(stack: Stack, cpf: str, n: int, kill: Callable[[], None]) -> float:
    """Register person `cpf` (the `n`th of new_person) and add an income to it every
    WRITE_INTERVAL through Traefik; once they replicate, `kill()`; seconds from then until an
    income written after it is in the person's set of the score read model."""
    store = stack.score_store()
    client, items = store.client, store.items_key(cpf)
    status, body = Gateway(stack.gateway_port).post("person", "/person", new_person(cpf, n))
    if status != 201:
        raise MeasureError(f"POST /person: {status} {body[:200]!r}")
    writer = PacedWriter(
        stack,
        lambda n: (f"/person/{cpf}/income", {"type": "bonus", "value": f"{n}.00"}),
        WRITE_INTERVAL,
    )
    try:
        writer.warm_up(STEADY_SECONDS)
        visible = answered_after(writer, 0)
        if not visible or not any(applied(client, items, visible[:1])):
            raise MeasureError("incomes were not replicating before the kill")
        killed_at = time.perf_counter()
        kill()
        while True:
            later = answered_after(writer, killed_at)
            if later and any(applied(client, items, later)):
                return time.perf_counter() - killed_at
            if time.perf_counter() - killed_at > STALL_TIMEOUT:
                raise MeasureError(f"nothing written after the kill applied in {STALL_TIMEOUT}s")
            time.sleep(POLL_INTERVAL)
    finally:
        writer.finish()
        client.close()
        if writer.failures:
            log.warning("%d writes failed, e.g. %s", len(writer.failures), writer.failures[0])


def applied(client: Any, items: str, ids: list[str]) -> list[bool]:
    """Whether each item is in the person's set; none while the store does not answer (a
    Redis Cluster failing over)."""
    try:
        pipe = client.pipeline(transaction=False)
        for item in ids:
            pipe.sismember(items, item)
        return [bool(found) for found in pipe.execute()]
    except (redis.RedisError, redis.exceptions.RedisClusterException):
        return []


def measure_failover(stack: Stack, cluster: Cluster) -> float:
    """SIGKILL the node that leads the work queues, which is also the node every client is
    connected to (the first of AMQP_URL), while incomes are written; seconds from the kill until
    an income written after it is in the score read model."""
    queue = stack.topologies()[0].queue  # the score's
    leader = cluster.leader(queue)
    killed_wall: list[float] = []

    def kill() -> None:
        killed_wall.append(time.time())
        cluster.kill(leader)
        log.info("failover: SIGKILLed %s, which led %s", leader, queue)

    stall = stall_after(stack, "77700000001", 1, kill)
    log.info(
        "failover: the score applied a write made after the kill %.2fs after it; new leader %s",
        stall,
        cluster.leader(queue),
    )
    with psycopg.connect(stack.person_db) as conn:  # where the stall was: before or after
        published = conn.execute(
            "SELECT extract(epoch FROM min(published_at)) - %s FROM messaging_outbox "
            "WHERE occurred_at > to_timestamp(%s)",
            (killed_wall[0], killed_wall[0]),
        ).fetchone()[0]
    log.info(
        "failover: the relay published the first write made after the kill %ss after it",
        f"{published:.2f}" if published is not None else "?",
    )
    timed("restarting the killed node", lambda: cluster.restart(leader))
    return stall


# -- where the time goes -----------------------------------------------------------------------
def cpu_by_process(stack: Stack, cluster: Cluster) -> dict[str, float]:
    """CPU seconds so far of each stack process (its whole process tree) and each node."""
    tree = children()
    used: dict[str, float] = {}
    for name, process in stack.processes.items():
        pids, todo = [], [process.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo += tree.get(pid, [])
        used[name] = sum(cpu_seconds(pid) for pid in pids)
    for name, node in cluster.nodes.items():
        pid = node.pid()
        used[name] = cpu_seconds(pid) if pid else 0.0
    return used


def log_cpu(before: dict[str, float], after: dict[str, float], what: str) -> None:
    spent = {name: after[name] - before.get(name, 0.0) for name in after}
    total = sum(spent.values())
    shares = ", ".join(
        f"{name} {seconds:.1f}" for name, seconds in sorted(spent.items(), key=lambda i: -i[1])
    )
    log.info("%s: CPU seconds by process (%.1f in all): %s", what, total, shares)


# -- driver ----------------------------------------------------------------------------------
def measure(figures: dict[str, float], step: Callable[[], float], name: str) -> None:
    started = time.monotonic()
    try:
        figures[name] = step()
    except Exception as exc:
        log.error("%s: not measured (%s: %s)", name, type(exc).__name__, exc)
        return
    show(name, figures[name])
    log.info("%s took %.1fs", name, time.monotonic() - started)


def run() -> dict[str, float]:
    figures: dict[str, float] = {}
    started = time.monotonic()
    with Cluster() as cluster:
        log.info("cluster up in %.1fs: %s", time.monotonic() - started, cluster.amqp_url)
        run_id = uuid.uuid4().hex[:8]
        with running_stack(run_id, cluster_overrides(cluster)) as stack:
            log.info("stack up (copies %s; logs in %s)", COPIES, stack.log_dir)
            models = ReadModels(stack)
            try:
                people = timed("prefill", lambda: prefill(stack.person_db, 0, E2E_PEOPLE))
                before = cpu_by_process(stack, cluster)
                measure(
                    figures,
                    lambda: measure_e2e(stack, models, people),
                    "cluster_e2e_events_s",
                )
                log_cpu(before, cpu_by_process(stack, cluster), "cluster e2e")
                if not set(stack.copies(RELAY)) & set(stack.processes):
                    stack.start(RELAY)
                settle(stack)
                measure(figures, lambda: measure_failover(stack, cluster), "failover_stall_s")
            finally:
                models.close()
    log.info("cluster benchmark took %.0fs", time.monotonic() - started)
    return figures


def interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None, single_e2e: float | None = None) -> int:
    """Run the cluster benchmark; 1 if a figure went unmeasured. With the single-node
    `e2e_events_s` of the same run (bench.py, or --single), also their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--single", action="store_true", help="measure the single-node e2e_events_s first"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, interrupted)
    if args.single:
        single: dict[str, float] = {}
        if stack_bench.main(["--steps", "e2e"], figures=single) == 0:
            single_e2e = single["e2e_events_s"]
    try:
        figures = run()
    except (Exception, KeyboardInterrupt) as exc:
        log.error("cluster benchmark aborted: %s: %s", type(exc).__name__, exc)
        return 1
    if single_e2e and "cluster_e2e_events_s" in figures:
        ratio = figures["cluster_e2e_events_s"] / single_e2e
        print(f"cluster_vs_single_e2e_ratio: {ratio:.2f}", flush=True)
    missing = {"cluster_e2e_events_s", "failover_stall_s"} - set(figures)
    if missing:
        log.error("not measured: %s", ", ".join(sorted(missing)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
