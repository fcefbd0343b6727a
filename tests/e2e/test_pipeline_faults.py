"""No single input or ordinary fault stops the pipeline, tried on the whole stack as a user would.

The stack's AMQP_URL starts with a node whose name does not resolve (a stopped container's name
in compose), so every process and the operator's command skip it for the whole module. The score
runs on a Redis of the module's own, which a test makes refuse writes; another makes the notifier
database read-only. Retry delays are short, so each outage outlasts the retry ladder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pika
import psycopg
import pytest
import redis
from messaging import Outbox
from messaging.connection import connect
from messaging.testing import wait_until
from messaging.topology import Topology
from own_servers import own_redis

pytestmark = pytest.mark.e2e

GONE = "amqp://guest:guest@rabbit-gone.invalid:5672/%2F"  # .invalid never resolves
DELAYS = (0.5, 1.0)
LADDER = sum(DELAYS)


@pytest.fixture(scope="module")
def score_redis() -> Iterator[str]:
    with own_redis() as url:
        yield url


@pytest.fixture(scope="module")
def stack(start_stack, servers, score_redis, stack_env):
    started = start_stack(
        AMQP_URL=f"{GONE},{servers.amqp}",
        SCORE_REDIS_URL=score_redis,
        RETRY_DELAYS=f"[{DELAYS[0]}, {DELAYS[1]}]",
    )
    yield started
    conn = connect(servers.amqp, "pipeline-faults-cleanup")
    try:
        channel = conn.channel()
        for service in ("score", "notifier"):  # the retry queues of these delays
            Topology(service, stack_env["EVENTS_EXCHANGE"], DELAYS).delete(channel)
    finally:
        conn.close()


def register(stack, cpf: str, **headers: str) -> int:
    body = {
        "cpf": cpf,
        "name": f"Person {cpf}",
        "address": "Rua da Aurora, 1",
        "date_of_birth": "1990-01-01",
        "email": f"p{cpf}@pipeline.example",
    }
    status, _, _ = stack.call("POST", "person", "/person", body, headers=headers)
    return status


def scored(stack, cpf: str, incomes: str | None = None) -> bool:
    status, body, _ = stack.call("GET", "score", f"/{cpf}/score")
    return status == 200 and (incomes is None or body["incomes"] == incomes)


def viewed(stack, cpf: str) -> bool:
    return stack.call("GET", "notifier", f"/users/{cpf}")[0] == 200


def dead(stack, service: str) -> int:
    queue = Topology(service, stack.env["EVENTS_EXCHANGE"]).dead_queue
    conn = connect(stack.env["AMQP_URL"], "pipeline-faults")
    try:
        return conn.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        conn.close()


def messaging_cli(stack, *args: str) -> subprocess.CompletedProcess:
    env = {**stack.env, "DATABASE_URL": stack.env["PERSON_DATABASE_URL"]}
    return subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "messaging"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_request_id_that_could_not_travel_is_replaced_and_every_later_write_replicates(stack):
    hostile = "é" * 180  # 360 bytes in UTF-8: more than an AMQP short string holds
    status, _, headers = stack.call(
        "POST",
        "person",
        "/person",
        {"cpf": "70000000001", "name": "A", "address": "B", "date_of_birth": "1990-01-01"},
        headers={"X-Request-Id": hostile},
    )
    assert status == 201
    assert uuid.UUID(headers["X-Request-Id"])  # replaced by a generated one
    status, _, headers = stack.call(  # the public activation link, no key needed
        "GET", "person", "/person/70000000001/activate?token=x", headers={"X-Request-Id": hostile}
    )
    assert status == 400 and uuid.UUID(headers["X-Request-Id"])
    assert register(stack, "70000000002", **{"X-Request-Id": "ok-request.1"}) == 201
    assert (
        stack.call("POST", "person", "/person/70000000002/income", {"type": "x", "value": 50})[0]
        == 201
    )
    wait_until(lambda: scored(stack, "70000000001"), what="the first write replicated")
    wait_until(lambda: scored(stack, "70000000002", "50.00"), what="a later write replicated")


def test_an_outbox_row_the_broker_cannot_take_is_parked_shown_and_sent_again(stack):
    assert register(stack, "70000000009") == 201
    with psycopg.connect(stack.env["PERSON_DATABASE_URL"]) as conn, conn.cursor() as cur:
        data = cur.execute(  # the person's state as its last event carries it
            "SELECT body::jsonb -> 'data' FROM messaging_outbox WHERE entity_id = %s",
            ("70000000009",),
        ).fetchone()[0]
        envelope = Outbox("person").add(
            cur, event_type="person.updated", entity_id="70000000009", data=data
        )
        cur.execute(  # as a writer that bypassed the envelope's checks would leave it
            "UPDATE messaging_outbox SET correlation_id = %s WHERE event_id = %s",
            ("é" * 180, envelope.event_id),
        )
    assert register(stack, "70000000010") == 201
    wait_until(lambda: scored(stack, "70000000010"), what="the rows behind it flow")

    def parked_shown() -> str | None:
        status = messaging_cli(stack, "outbox", "status")
        return status.stdout if "parked: 1" in status.stdout else None

    shown = wait_until(parked_shown, what="the parked row listed")
    assert "ShortStringTooLong" in shown and "person.updated 70000000009 v2" in shown
    _, metrics, _ = stack.call("GET", "person", "/metrics")
    assert "outbox_parked 1.0" in metrics
    _, page, _ = stack.call("GET", "console", "/overview/live")
    assert "Parked outbox rows" in page and "ShortStringTooLong" in page
    with psycopg.connect(stack.env["PERSON_DATABASE_URL"]) as conn:
        conn.execute(
            "UPDATE messaging_outbox SET correlation_id = 'fixed' WHERE event_id = %s",
            (envelope.event_id,),
        )
    assert messaging_cli(stack, "outbox", "retry", "--all").returncode == 0
    wait_until(
        lambda: "parked: 0" in messaging_cli(stack, "outbox", "status").stdout,
        what="published after the retry",
    )


def test_every_process_and_the_operators_command_skip_a_node_whose_name_does_not_resolve(stack):
    assert stack.env["AMQP_URL"].startswith(GONE)
    for host in ("person", "score", "notifier"):
        try:
            wait_until(lambda h=host: stack.call("GET", h, "/ready")[0] == 200, what="ready")
        except AssertionError:
            raise AssertionError(f"{host}: {stack.call('GET', host, '/ready')[1]}") from None
    assert register(stack, "70000000020") == 201
    wait_until(lambda: scored(stack, "70000000020") and viewed(stack, "70000000020"), what="both")
    listing = messaging_cli(stack, "dlq", "list", f"score.{stack.env['EVENTS_EXCHANGE']}")
    assert listing.returncode == 0, listing.stderr
    assert "dead message(s)" in listing.stdout


def test_redis_refusing_writes_longer_than_the_retry_ladder_loses_nothing(stack, score_redis):
    admin = redis.Redis.from_url(score_redis)
    admin.config_set("maxmemory", 1)  # every write answers OOM from now on
    try:
        cpfs = [f"7000000010{n}" for n in range(5)]
        for cpf in cpfs:
            assert register(stack, cpf) == 201
            asset = {"type": "x", "value": 20}
            assert stack.call("POST", "person", f"/person/{cpf}/asset", asset)[0] == 201

        def says_why() -> bool:
            _, ready, _ = stack.call("GET", "score", "/ready")
            return ready["checks"]["redis"] == "failing: OutOfMemoryError"

        wait_until(says_why, what="the score's /ready saying why")
        over = time.monotonic() + 4 * LADDER
        wait_until(lambda: time.monotonic() > over, what="longer than the retry ladder")
        assert not any(scored(stack, cpf) for cpf in cpfs)
    finally:
        admin.config_set("maxmemory", 0)
    for cpf in cpfs:
        wait_until(lambda c=cpf: scored(stack, c, None), timeout=60, what=f"{cpf} scored")
    wait_until(lambda: stack.call("GET", "score", "/ready")[0] == 200, what="score ready again")
    assert dead(stack, "score") == 0


def test_the_notifier_database_read_only_longer_than_the_retry_ladder_loses_nothing(stack):
    url = stack.env["NOTIFIER_DATABASE_URL"]
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    admin_url = psycopg.conninfo.make_conninfo(url, dbname="postgres")

    def read_only(on: bool) -> None:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {on}')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )

    read_only(True)
    try:
        cpfs = [f"7000000020{n}" for n in range(5)]
        for cpf in cpfs:
            assert register(stack, cpf) == 201

        def says_why() -> bool:
            _, ready, _ = stack.call("GET", "notifier", "/ready")
            return ready["checks"].get("database") == "failing: ReadOnlySqlTransaction"

        wait_until(says_why, what="the notifier's /ready saying why")
        over = time.monotonic() + 4 * LADDER
        wait_until(lambda: time.monotonic() > over, what="longer than the retry ladder")
    finally:
        read_only(False)
    for cpf in cpfs:
        wait_until(lambda c=cpf: viewed(stack, c), timeout=60, what=f"{cpf} in the view")
    wait_until(lambda: stack.call("GET", "notifier", "/ready")[0] == 200, what="ready again")
    assert dead(stack, "notifier") == 0


def test_a_replay_request_for_an_unknown_queue_is_refused(stack):
    """Anyone on the broker could ask for a full replay into a queue of their own."""
    spy = f"spy-{uuid.uuid4().hex[:8]}"
    conn = connect(stack.env["AMQP_URL"], "pipeline-faults")
    try:
        channel = conn.channel()
        channel.queue_declare(spy, auto_delete=False)
        channel.basic_publish(
            "",
            f"{stack.env['EVENTS_EXCHANGE']}.replay-requests",
            b'{"queue": "%s", "request_id": "spy"}' % spy.encode(),
            pika.BasicProperties(delivery_mode=2),
        )
        over = time.monotonic() + 3
        wait_until(lambda: time.monotonic() > over, what="time for a replay to happen")
        assert channel.queue_declare(spy, passive=True).method.message_count == 0
        channel.queue_delete(spy)
    finally:
        conn.close()
