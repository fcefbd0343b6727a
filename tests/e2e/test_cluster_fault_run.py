"""The cluster fault run: the whole stack with replicas on a three-node RabbitMQ cluster while
its nodes and processes die (DESIGN §6, issue 19).

The stack runs with 3 score consumers, 2 notifier consumers, 2 e-mail senders and 2 relays (one
active through the advisory lock, one standby) against c1..c3@localhost (AMQP_URL lists them,
c1 first; every queue has a member on each node). 2,000 registrations with e-mails and 6,000 item
writes go through Traefik while, in this order, the node leading the queues is SIGKILLed and
later started again, a second node is stopped cleanly and started again, the active relay is
SIGKILLed (the standby takes over) and one score consumer replica is SIGKILLed for good. The
faults are sequenced so that two of the three nodes run at every moment: a quorum queue needs a
majority. The load waits at fixed points until the next fault is in place, so every run
interleaves the same way; the fake SendGrid fails a tenth of its calls.

Afterwards both read models must equal the person database, every person must have exactly one
accepted welcome e-mail, no retry queue may hold anything and the dead queues only the poison
published at the start.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fault_load import Load, Step, Verdict, drain, publish
from messaging.connection import connect
from messaging.replay import requests_queue
from messaging.testing import wait_until
from messaging.topology import Topology
from relay_lock import relay_lock_holders
from score.store import ScoreStore
from stack import up as stack
from stack.fake_sendgrid import FakeSendGrid
from stack.processes import Gateway, Processes

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

PEOPLE = 2000
WRITERS = 8
POISON = 10
CONVERGE_SECONDS = 90.0
REPLICAS = {
    "SCORE_CONSUMERS": "3",
    "NOTIFIER_CONSUMERS": "2",
    "NOTIFIER_SENDERS": "2",
    "PERSON_RELAYS": "2",
}
KILLED_CONSUMER = "score-consumer.2"


def active_relay(supervisor: Processes, person_db: str) -> str | None:
    """The relay copy that holds the advisory lock, or None while none does: the lock's
    session is named after its replica, `messaging-relay@<host>:<pid>`."""
    holders = relay_lock_holders(person_db)
    if not holders:
        return None
    pid = int(holders[0].rpartition(":")[2])
    for name in supervisor.copies("person-relay"):
        process = supervisor.processes[name]
        if process.pid == pid and process.poll() is None:
            return name
    return None


@pytest.fixture
def fake_sendgrid() -> Iterator[FakeSendGrid]:
    fake = FakeSendGrid(failure_rate=0.1, seed=20261202).start()
    yield fake
    fake.stop()


@pytest.mark.timeout(600)  # about two minutes here; more on a loaded machine
def test_every_guarantee_holds_on_a_cluster_losing_nodes_and_replicas(
    stack_env, rabbit_cluster, fake_sendgrid, tmp_path
):
    cluster = rabbit_cluster
    env = {
        **stack_env,
        **REPLICAS,
        "AMQP_URL": cluster.amqp_url,
        "QUEUE_GROUP_SIZE": "3",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "SENDGRID_API_KEY": "SG.cluster-fault-run-key",
        "SENDGRID_HOST": fake_sendgrid.url,
        "SENDGRID_TIMEOUT_SECONDS": "1",
        "SENDER_LEASE_SECONDS": "4",
        "SENDER_POLL_SECONDS": "0.2",
        "SENDER_MAX_ATTEMPTS": "20",
        "SENDER_BACKOFF_CAP_SECONDS": "5",
    }
    exchange, amqp = env["EVENTS_EXCHANGE"], env["AMQP_URL"]
    person_db, notifier_db = env["PERSON_DATABASE_URL"], env["NOTIFIER_DATABASE_URL"]
    delays = tuple(json.loads(env["RETRY_DELAYS"]))
    topologies = [Topology(service, exchange, delays, 3) for service in ("score", "notifier")]
    ours = [name for t in topologies for name in (t.queue, t.dead_queue, *t.retry_queues)]
    stack.prepare(env)  # declares the queues through c1: c1 leads them all
    supervisor = Processes(env, tmp_path)
    gateway = Gateway(int(env["GATEWAY_PORT"]))
    poison = [(f"poison-{exchange}-{n}", b"not json {" + str(n).encode()) for n in range(POISON)]
    score_store = ScoreStore.from_url(env["SCORE_REDIS_URL"], exchange + ":")
    timeline: list[str] = []
    nodes: dict[str, str] = {}  # "killed" and "stopped": which node each fault took
    began = time.monotonic()

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - began:6.1f}s {what}")

    def leading_node() -> str:
        leaders = collections.Counter(cluster.leader(t.queue) for t in topologies)
        return leaders.most_common(1)[0][0]

    def all_members_online() -> bool:
        queues = cluster.queues()
        return all(len(queues[name]["online"]) == 3 for name in ours)

    def kill_leader() -> None:
        nodes["killed"] = leading_node()
        cluster.kill(nodes["killed"])
        note(f"SIGKILLed {nodes['killed']}, which led the work queues")

    def restart_killed() -> None:
        cluster.restart(nodes["killed"])
        # Every queue's three members run again before the next node goes: two of them then
        # make a majority whichever node is stopped.
        wait_until(all_members_online, timeout=60, interval=0.5, what="every member online")
        note(f"{nodes['killed']} runs again, every queue member online")

    def stop_second() -> None:
        leader = leading_node()  # the new leaders' node, unless leadership went back
        if leader == nodes["killed"]:
            leader = next(n for n in cluster.nodes if n != nodes["killed"])
        nodes["stopped"] = leader
        cluster.stop_app(leader)
        note(f"stopped {leader} cleanly")

    def start_second() -> None:
        cluster.start_app(nodes["stopped"])
        note(f"{nodes['stopped']} started again")

    def kill_active_relay() -> None:
        active = wait_until(lambda: active_relay(supervisor, person_db), what="an active relay")
        supervisor.kill(active)
        standby = wait_until(
            lambda: active_relay(supervisor, person_db), timeout=30, what="the standby leads"
        )
        assert standby != active
        supervisor.start(active)  # the new standby
        note(f"SIGKILLed the active relay {active}; {standby} took over")

    def kill_consumer_replica() -> None:
        supervisor.kill(KILLED_CONSUMER)
        note(f"SIGKILLed {KILLED_CONSUMER} (not restarted)")

    steps = [
        Step(50, "poison", lambda: publish(amqp, exchange, poison)),
        Step(150, "leader node killed", kill_leader),
        Step(500, "killed node restarted", restart_killed, pause=False),
        Step(700, "active relay killed", kill_active_relay),
        Step(900, "second node stopped", stop_second),
        Step(1150, "second node started", start_second, pause=False),
        Step(1400, "consumer replica killed", kill_consumer_replica),
    ]
    load = Load(
        gateway,
        steps,
        people=PEOPLE,
        writers=WRITERS,
        seed=19,
        cpf_base=80_000_000_000,
        domain="cluster.example",
    )

    def replicas_reporting() -> bool:
        with psycopg.connect(notifier_db) as conn:
            beats = collections.Counter(
                name.partition("@")[0]
                for (name,) in conn.execute(
                    "SELECT name FROM heartbeats WHERE seen_at > now() - interval '10 seconds'"
                )
            )
        return len(score_store.beacons()) == 3 and beats == {
            "notifier-consumer": 2,
            "notifier-sender": 2,
        }

    try:
        supervisor.start_all()
        for host in ("person", "score", "notifier"):
            wait_until(
                lambda h=host: stack.healthy(h, env["GATEWAY_PORT"]),
                timeout=90,
                what=f"{host} healthy",
            )
        wait_until(replicas_reporting, timeout=60, interval=0.5, what="every replica beating")
        wait_until(lambda: active_relay(supervisor, person_db), what="one relay active")
        note("3 score consumers, 2 notifier consumers, 2 senders and 2 relays running")
        load.run(timeout=400)
        note("load done")

        verdict = Verdict(person_db, notifier_db, score_store, fake_sendgrid)
        assert len(verdict.emails) == PEOPLE
        verdict.wait_converged(
            CONVERGE_SECONDS, lambda: "\n".join([*timeline, supervisor.log_tails()])
        )
        note("both read models equal the person database, every welcome accepted")
        verdict.assert_one_welcome_each()

        def retries_waiting() -> dict[str, int]:
            queues = cluster.queues()
            return {
                name: queues[name]["messages"]
                for t in topologies
                for name in t.retry_queues
                if queues[name]["messages"]
            }

        wait_until(lambda: not retries_waiting(), timeout=60, interval=1, what="retries empty")
        poison_ids = {message_id for message_id, _ in poison}
        for topology in topologies:
            dead = drain(amqp, topology.dead_queue)
            assert {message_id for message_id, _ in dead} == poison_ids, topology.service
            assert len(dead) == POISON, topology.service  # nothing healthy, no poison twice
            assert all(h["x-dead-reason"].startswith("DecodeError") for _, h in dead)
        assert supervisor.exited() == {KILLED_CONSUMER: -9}, supervisor.log_tails()
        note("retry queues empty, dead queues hold the poison only")
        print("\n".join(timeline))
    finally:
        load.release()  # never leave a writer waiting
        supervisor.stop_all()
        remove_queues(cluster, topologies, exchange)


def remove_queues(cluster, topologies: list[Topology], exchange: str) -> None:
    """Delete this run's queues and exchange from the cluster, every node running first."""
    cluster.heal()
    conn = connect(cluster.amqp_url, "cluster-fault-run")
    try:
        channel = conn.channel()
        for topology in topologies:
            topology.delete(channel)
        channel.queue_delete(requests_queue(exchange))
        channel.exchange_delete(exchange)
    finally:
        conn.close()
