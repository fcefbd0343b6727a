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
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

import pika
import psycopg
import pytest
import redis
import stack
from fake_sendgrid import FakeSendGrid
from messaging.connection import connect
from messaging.relay import LEADER_LOCK
from messaging.replay import requests_queue
from messaging.testing import wait_until
from messaging.topology import Topology
from processes import Gateway, Processes
from score.store import ScoreStore

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

PEOPLE = 2000
KINDS = ("income", "asset", "debt")
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


@dataclass
class Step:
    """A fault applied when the load reaches person number `at`; the load waits until it is,
    unless the fault takes a while and the load should go on meanwhile (pause=False)."""

    at: int
    name: str
    apply: Callable[[], None]
    pause: bool = True
    reached: threading.Event = field(default_factory=threading.Event)
    applied: threading.Event = field(default_factory=threading.Event)


def expected_state(person_db: str) -> tuple[dict[str, str], dict[str, tuple]]:
    """From the person database: e-mail per CPF, and (score, incomes, assets, debts) per CPF."""

    def floor(value: Decimal, step: int) -> int:
        return int((value / step).to_integral_value(rounding=ROUND_FLOOR))

    with psycopg.connect(person_db) as conn:
        emails = dict(conn.execute("SELECT cpf, email FROM person").fetchall())
        totals = {cpf: {k: Decimal("0.00") for k in KINDS} for cpf in emails}
        points = dict.fromkeys(emails, 0)
        for cpf, kind, value in conn.execute("SELECT cpf, kind, value FROM item"):
            totals[cpf][kind] += value
            step = {"income": 50, "asset": 20, "debt": 20}[kind]
            points[cpf] += -floor(value, step) if kind == "debt" else floor(value, step)
    scores = {cpf: (points[cpf], t["income"], t["asset"], t["debt"]) for cpf, t in totals.items()}
    return emails, scores


def active_relay(supervisor: Processes, person_db: str) -> str | None:
    """The relay copy that holds the advisory lock, or None while none does: the lock's
    session is named after its replica, `messaging-relay@<host>:<pid>`."""
    with psycopg.connect(person_db) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.objid = %s AND l.granted",
            (LEADER_LOCK,),
        ).fetchone()
    if row is None:
        return None
    pid = int(row[0].rpartition(":")[2])
    for name in supervisor.copies("person-relay"):
        process = supervisor.processes[name]
        if process.pid == pid and process.poll() is None:
            return name
    return None


def publish(amqp_url: str, exchange: str, messages: list[tuple[str, bytes]]) -> None:
    conn = connect(amqp_url, "cluster-fault-run")
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for message_id, body in messages:
            channel.basic_publish(
                exchange,
                "",
                body,
                pika.BasicProperties(message_id=message_id, delivery_mode=2),
                mandatory=True,
            )
    finally:
        conn.close()


def drain(amqp_url: str, queue: str) -> list[tuple[str, dict]]:
    """Every message of a queue: (message_id, headers)."""
    conn = connect(amqp_url, "cluster-fault-run")
    found = []
    try:
        channel = conn.channel()
        while True:
            method, properties, _ = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((properties.message_id, properties.headers or {}))
    finally:
        conn.close()


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
    score_store = ScoreStore(redis.Redis.from_url(env["SCORE_REDIS_URL"]), exchange + ":")
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
    gates = {step.at: step for step in steps}
    rng = random.Random(19)
    items = [
        [(kind, str(Decimal(rng.randint(0, 5_000_000)) / 100)) for kind in KINDS]
        for _ in range(PEOPLE)
    ]
    failures: list[str] = []
    next_person = iter(range(PEOPLE))
    lock = threading.Lock()

    def writer() -> None:
        while True:
            with lock:
                n = next(next_person, None)
                step = gates.get(n)
                if step is not None:
                    step.reached.set()
                    if step.pause:
                        step.applied.wait(180)
            if n is None:
                return
            cpf = f"{80_000_000_000 + n}"
            status, body = gateway.call(
                "POST",
                "person",
                "/person",
                {
                    "cpf": cpf,
                    "name": f"Person {n}",
                    "address": "Rua da Aurora",
                    "date_of_birth": "1990-01-01",
                    "email": f"p{n}@cluster.example",
                },
            )
            if status != 201:
                failures.append(f"register {cpf}: {status} {body[:200]!r}")
                continue
            for kind, value in items[n]:
                status, body = gateway.call(
                    "POST", "person", f"/person/{cpf}/{kind}", {"type": "x", "value": value}
                )
                if status != 201:
                    failures.append(f"{kind} {cpf}: {status} {body[:200]!r}")

    def chaos() -> None:
        for step in steps:
            step.reached.wait(600)
            try:
                step.apply()
            except BaseException as exc:  # the run goes on; the failure is reported below
                failures.append(f"fault {step.name!r} could not be applied: {exc!r}")
            finally:
                step.applied.set()

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
        workers = [threading.Thread(target=writer) for _ in range(WRITERS)]
        chaos_thread = threading.Thread(target=chaos)
        for thread in (*workers, chaos_thread):
            thread.start()
        for thread in (*workers, chaos_thread):
            thread.join(timeout=400)
        assert not failures, failures[:10]
        assert not any(t.is_alive() for t in (*workers, chaos_thread)), "the load did not finish"
        note("load done")

        emails, scores = expected_state(person_db)
        assert len(emails) == PEOPLE

        def score_mismatches() -> list[str]:
            wrong = []
            for cpf, (points, incomes, assets, debts) in scores.items():
                got = score_store.read(cpf)
                if got is None or (got.score, got.incomes, got.assets, got.debts) != (
                    points,
                    incomes,
                    assets,
                    debts,
                ):
                    wrong.append(cpf)
            return wrong

        def view_mismatches() -> list[str]:
            with psycopg.connect(notifier_db) as conn:
                view = dict(conn.execute("SELECT cpf, email FROM users WHERE NOT deleted"))
            return [cpf for cpf, email in emails.items() if view.get(cpf) != email] + [
                cpf for cpf in view if cpf not in emails
            ]

        def unsent() -> list[str]:
            accepted = collections.Counter(
                m["personalizations"][0]["to"][0]["email"] for m in list(fake_sendgrid.accepted)
            )
            return [email for email in emails.values() if accepted[email] == 0]

        def converged() -> bool:
            return not score_mismatches() and not view_mismatches() and not unsent()

        try:
            wait_until(converged, timeout=CONVERGE_SECONDS, interval=0.5, what="convergence")
        except AssertionError:
            detail = (
                f"scores wrong: {len(score_mismatches())}, views wrong: {len(view_mismatches())}, "
                f"e-mails missing: {len(unsent())}\n{chr(10).join(timeline)}\n"
                f"{supervisor.log_tails()}"
            )
            raise AssertionError(f"no convergence within {CONVERGE_SECONDS}s: {detail}") from None
        note("both read models equal the person database, every welcome accepted")

        accepted = collections.Counter(
            m["personalizations"][0]["to"][0]["email"] for m in list(fake_sendgrid.accepted)
        )
        duplicates = {email: n for email, n in accepted.items() if n != 1}
        assert not duplicates, f"welcome e-mails sent more than once: {duplicates}"
        assert set(accepted) == set(emails.values())

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
        for step in steps:  # never leave a writer waiting
            step.applied.set()
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
