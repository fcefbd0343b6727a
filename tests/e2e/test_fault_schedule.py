"""The generated fault schedule: hypothesis draws faults and their timings, interleaved with
writes through Traefik, and a ledger check follows each schedule.

Faults: a process killed (SIGKILL, then started again), the broker restarted, Redis refusing
writes, the notifier database read-only, the name of the first broker node gone (processes that
connect again meet a name that does not resolve), poison messages on the exchange, a hostile
request header on a write, an outbox row the broker cannot take. Each is applied when the load
reaches a drawn registration, and the outages last a drawn time. Afterwards: every write the
API acknowledged is in both read models, each address got exactly one welcome, the dead queues
hold exactly the poison of the schedule, and the parked outbox rows exactly its hostile rows.

Five schedules run in `make test` (two written out so that every kind of fault is played, three
drawn), forty drawn ones in `make soak` (HYPOTHESIS_PROFILE=soak).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import psycopg
import pytest
import redis
from fault_load import Load, Step, Verdict, drain, publish
from hosts import HostsName, can_edit
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from messaging import Outbox
from messaging import outbox as outbox_module
from messaging.connection import connect
from messaging.testing import wait_until
from messaging.topology import Topology
from notifier.config import NotifierConfig
from own_servers import own_redis
from score.store import ScoreStore
from stack import up as stack_script
from stack.fake_sendgrid import FakeSendGrid
from stack.processes import Gateway, Processes

pytestmark = [pytest.mark.e2e, pytest.mark.faults, pytest.mark.serial]

SOAK = os.environ.get("HYPOTHESIS_PROFILE") == "soak"
SCHEDULES = 40 if SOAK else 3
DELAYS = (0.5, 1.0)
CONVERGE_SECONDS = 90.0
KILLABLE = ("person-relay", "score-consumer", "notifier-consumer", "notifier-sender")
OUTAGES = ("broker restarted", "redis refuses writes", "notifier read-only", "name gone")
INPUTS = ("poison", "hostile header", "hostile outbox row")
KINDS = tuple(f"kill {name}" for name in KILLABLE) + OUTAGES + INPUTS
if not can_edit():  # /etc/hosts not ours to change here: that one fault cannot be played
    KINDS = tuple(kind for kind in KINDS if kind != "name gone")


@dataclass(frozen=True)
class Fault:
    at: int  # the registration (of the schedule's) at which it starts
    kind: str
    hold: float  # seconds an outage lasts


@st.composite
def schedules(draw: st.DrawFn) -> tuple[int, list[Fault]]:
    people = draw(st.integers(min_value=15, max_value=40), label="people")
    faults = draw(
        st.lists(
            st.builds(
                Fault,
                at=st.integers(min_value=0, max_value=people - 1),
                kind=st.sampled_from(KINDS),
                hold=st.floats(min_value=0.5, max_value=4.0),
            ),
            min_size=2,
            max_size=6,
        ),
        label="faults",
    )
    return people, sorted(faults, key=lambda f: f.at)


@dataclass
class World:
    """The stack the schedules run against, and the handles its faults need."""

    env: dict[str, str]
    supervisor: Processes
    gateway: Gateway
    sendgrid: FakeSendGrid
    servers: object
    redis_url: str
    node: HostsName
    cpfs: Iterator[int]


@pytest.fixture(scope="module")
def world(stack_env, servers, tmp_path_factory) -> Iterator[World]:
    sendgrid = FakeSendGrid(failure_rate=0.1, seed=20261207).start()
    node = HostsName()
    if can_edit():
        node.resolve()
    with own_redis() as redis_url:
        first = servers.amqp.replace("127.0.0.1", node.name, 1)
        env = {
            **stack_env,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            "AMQP_URL": f"{first},{servers.amqp}" if can_edit() else servers.amqp,
            "SCORE_REDIS_URL": redis_url,
            "RETRY_DELAYS": json.dumps(DELAYS),
            "SENDGRID_API_KEY": "SG.schedule-key",
            "SENDGRID_HOST": sendgrid.url,
            "SENDGRID_TIMEOUT_SECONDS": "1",
            "SENDER_LEASE_SECONDS": "4",
            "SENDER_POLL_SECONDS": "0.2",
            "SENDER_MAX_ATTEMPTS": "30",
            "SENDER_BACKOFF_CAP_SECONDS": "2",
        }
        stack_script.prepare(env)
        supervisor = Processes(env, tmp_path_factory.mktemp("schedule"))
        try:
            supervisor.start_all()
            for host in ("person", "score", "notifier"):
                wait_until(
                    lambda h=host: stack_script.healthy(h, env["GATEWAY_PORT"]),
                    timeout=90,
                    what=f"{host} healthy",
                )
            yield World(
                env,
                supervisor,
                Gateway(int(env["GATEWAY_PORT"])),
                sendgrid,
                servers,
                redis_url,
                node,
                itertools.count(95_000_000_000, 1000),
            )
        finally:
            supervisor.stop_all()
            sendgrid.stop()
            node.forget()
            conn = connect(servers.amqp, "schedule-cleanup")
            try:
                channel = conn.channel()
                for service in ("score", "notifier"):
                    Topology(service, env["EVENTS_EXCHANGE"], DELAYS).delete(channel)
            finally:
                conn.close()


class Faults:
    """What each kind of fault does to the world, and how it is undone."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.poison: set[str] = set()
        self.hostile_rows: set[str] = set()
        self.undo: list[threading.Thread] = []
        self.lock = threading.Lock()

    def apply(self, fault: Fault) -> None:
        w = self.world
        if fault.kind.startswith("kill "):
            w.supervisor.restart(fault.kind.removeprefix("kill "))
        elif fault.kind == "broker restarted":
            w.servers.broker.stop()
            self._later(fault.hold, w.servers.broker.start)
        elif fault.kind == "redis refuses writes":
            self._redis_maxmemory(1)
            self._later(fault.hold, lambda: self._redis_maxmemory(0))
        elif fault.kind == "notifier read-only":
            self._notifier_read_only(True)
            self._later(fault.hold, lambda: self._notifier_read_only(False))
        elif fault.kind == "name gone":
            w.node.forget()
            w.supervisor.restart("score-consumer")  # connects again: meets the name gone
            self._later(fault.hold, w.node.resolve)
        elif fault.kind == "poison":
            self._poison()
        elif fault.kind == "hostile header":
            cpf = str(next(w.cpfs))
            status, _ = w.gateway.call(
                "POST",
                "person",
                "/person",
                {
                    "cpf": cpf,
                    "name": "H",
                    "address": "A",
                    "date_of_birth": "1990-01-01",
                    "email": f"h{cpf}@schedule.example",
                },
                headers={"X-Request-Id": "é" * 180},
            )
            assert status == 201, status
        elif fault.kind == "hostile outbox row":
            self._hostile_row()

    def finish(self) -> None:
        """Undo every outage still on."""
        for thread in list(self.undo):
            thread.join(timeout=60)

    def _later(self, seconds: float, undo: Callable[[], None]) -> None:
        # The outage's drawn length: the schedule's own timing, not a wait for an effect.
        thread = threading.Timer(seconds, undo)
        thread.start()
        self.undo.append(thread)

    def _redis_maxmemory(self, limit: int) -> None:
        redis.Redis.from_url(self.world.redis_url).config_set("maxmemory", limit)

    def _notifier_read_only(self, on: bool) -> None:
        url = self.world.env["NOTIFIER_DATABASE_URL"]
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        admin_url = psycopg.conninfo.make_conninfo(url, dbname="postgres")
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {on}')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )

    def _poison(self) -> None:
        message_id = f"poison-{uuid.uuid4()}"
        with self.lock:
            self.poison.add(message_id)

        def published() -> bool:  # the broker may be down in this very schedule
            try:
                publish(world.servers.amqp, world.env["EVENTS_EXCHANGE"], [(message_id, b"{")])
                return True
            except pika.exceptions.AMQPError:
                return False

        world = self.world
        wait_until(published, timeout=120, interval=0.5, what="the poison published")

    def _hostile_row(self) -> None:
        with psycopg.connect(self.world.env["PERSON_DATABASE_URL"]) as conn, conn.cursor() as cur:
            envelope = Outbox("person").add(
                cur, event_type="person.deleted", entity_id=f"hostile-{uuid.uuid4()}", data=None
            )
            cur.execute(
                "UPDATE messaging_outbox SET correlation_id = %s WHERE event_id = %s",
                ("é" * 180, envelope.event_id),
            )
        with self.lock:
            self.hostile_rows.add(str(envelope.event_id))


def run_schedule(world: World, people: int, faults: list[Fault]) -> None:
    effects = Faults(world)
    by_index: dict[int, list[Fault]] = {}
    for fault in faults:
        by_index.setdefault(fault.at, []).append(fault)
    steps = [
        Step(at, ", ".join(f.kind for f in group), lambda g=group: [effects.apply(f) for f in g])
        for at, group in sorted(by_index.items())
    ]
    base = next(world.cpfs)
    load = Load(
        world.gateway,
        steps,
        people=people,
        writers=4,
        seed=people,
        cpf_base=base,
        domain=f"s{base}.example",  # addresses of this schedule's own: one welcome each
    )
    try:
        load.run(timeout=300)
    finally:
        load.release()
        effects.finish()
    exchange = world.env["EVENTS_EXCHANGE"]
    store = ScoreStore.from_url(world.redis_url, exchange + ":")
    verdict = Verdict(
        world.env["PERSON_DATABASE_URL"], world.env["NOTIFIER_DATABASE_URL"], store, world.sendgrid
    )
    verdict.wait_converged(CONVERGE_SECONDS, world.supervisor.log_tails)
    # A sender SIGKILLed holds at most SENDER_CONCURRENCY e-mails between their 202 and mark.
    kills = sum(fault.kind == "kill notifier-sender" for fault in faults)
    default = NotifierConfig.model_fields["sender_concurrency"].default
    verdict.assert_one_welcome_each(kills * int(world.env.get("SENDER_CONCURRENCY", default)))
    for service in ("score", "notifier"):
        dead = {message_id for message_id, _ in drain(world.servers.amqp, _dead(service, exchange))}
        assert dead == effects.poison, (service, faults)
    with psycopg.connect(world.env["PERSON_DATABASE_URL"]) as conn:
        parked = {row["event_id"] for row in outbox_module.parked(conn, limit=1000)}
        conn.execute("DELETE FROM messaging_outbox WHERE parked_at IS NOT NULL")
    assert parked == effects.hostile_rows, faults
    assert world.supervisor.exited() == {}, world.supervisor.log_tails()


def _dead(service: str, exchange: str) -> str:
    return Topology(service, exchange).dead_queue


@pytest.mark.timeout(1800 if SOAK else 900)
@settings(
    max_examples=SCHEDULES,
    deadline=None,
    derandomize=not SOAK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@example(  # every kind of outage and input at least once, besides the drawn schedules
    schedule=(
        30,
        [
            Fault(3, "broker restarted", 3.0),
            Fault(6, "redis refuses writes", 2.5),
            Fault(8, "poison", 0),
            Fault(10, "hostile header", 0),
            Fault(12, "name gone", 2.0),
            Fault(14, "kill score-consumer", 0),
        ],
    )
)
@example(
    schedule=(
        30,
        [
            Fault(2, "notifier read-only", 3.0),
            Fault(5, "kill person-relay", 0),
            Fault(7, "hostile outbox row", 0),
            Fault(9, "kill notifier-sender", 0),
            Fault(11, "kill notifier-consumer", 0),
            Fault(13, "poison", 0),
        ],
    )
)
@given(schedule=schedules())
def test_every_acknowledged_write_is_in_every_read_model_whatever_the_fault_schedule(
    world, schedule
):
    people, faults = schedule
    print(f"schedule: {people} people, faults {faults}")  # shown with a failure
    try:
        run_schedule(world, people, faults)
    finally:
        world.servers.broker.ensure_running()
        if can_edit():
            world.node.resolve()
