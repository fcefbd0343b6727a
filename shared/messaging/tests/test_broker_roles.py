"""Integration: each role's broker user (permissions.py) does its work and nothing else's.

Users of this test's own are made on the real broker with rabbitmqctl and deleted afterwards
(the server's existing users are left alone); their permissions are the ones
`messaging broker-user ROLE` gives through the management API.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pika
import psycopg
import pytest
from messaging import Consumer, ConsumerSettings, Envelope, Outbox, Relay, RelaySettings
from messaging.cli import main
from messaging.connection import connect
from messaging.errors import RetryableError
from messaging.permissions import permissions
from messaging.replay import declare_requests, request_replay, requests_queue
from messaging.testing import running, wait_until
from pika.exceptions import ChannelClosedByBroker

pytestmark = pytest.mark.integration

ACCESS_REFUSED = 403
CONSUMERS = ("score", "notifier")


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def role_url(servers, broker) -> Iterator[Callable[[str], str]]:
    """A user of this test's own per role, with the role's permissions on the test's exchange."""
    if servers.amqp != "amqp://guest:guest@127.0.0.1:5672/%2F":
        pytest.skip("users are made with the local node's rabbitmqctl")
    made: list[str] = []

    def make(role: str) -> str:
        user, password = f"test-{role}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        _ctl("add_user", user, password)
        made.append(user)
        granted = permissions(role, broker.exchange, CONSUMERS)
        _ctl(
            "set_permissions",
            "-p",
            "/",
            user,
            granted["configure"],
            granted["write"],
            granted["read"],
        )
        return f"amqp://{urllib.parse.quote(user)}:{password}@127.0.0.1:5672/%2F"

    yield make
    for user in made:
        _ctl("delete_user", user)


@pytest.fixture
def declared(broker) -> None:
    """What the migrate step declares as the administrator: both consumers' queues, the
    exchange and the requests queue."""
    conn = connect(broker.amqp_url, "test-migrate")
    try:
        for service in CONSUMERS:
            broker.topology(service).declare(conn)
        declare_requests(conn, broker.exchange)
    finally:
        conn.close()


def _refused(url: str, act: Callable[[pika.adapters.blocking_connection.BlockingChannel], object]):
    conn = connect(url, "test-refused")
    try:
        with pytest.raises(ChannelClosedByBroker) as refused:
            act(conn.channel())
        assert refused.value.reply_code == ACCESS_REFUSED
    finally:
        if conn.is_open:
            conn.close()


def _forged(exchange: str) -> Callable:
    def publish(channel) -> None:
        channel.confirm_delivery()
        channel.basic_publish(
            exchange,
            "",
            b'{"event_type": "debt.created"}',
            pika.BasicProperties(type="debt.created", message_id=str(uuid.uuid4())),
        )

    return publish


@pytest.mark.parametrize("role", ["score", "notifier", "operator", "probe"])
def test_no_role_but_the_relay_can_publish_an_event(role, role_url, broker, declared):
    _refused(role_url(role), _forged(broker.exchange))


def test_the_score_consumer_cannot_read_the_notifiers_queues(role_url, broker, declared):
    url = role_url("score")
    notifier = broker.topology("notifier")
    for queue in (notifier.queue, notifier.dead_queue, notifier.retry_queues[0]):
        _refused(url, lambda channel, queue=queue: channel.basic_get(queue))
    _refused(url, lambda channel: channel.queue_delete(notifier.queue))
    _refused(url, lambda channel: channel.exchange_delete(broker.exchange))
    _refused(url, lambda channel: channel.basic_get(requests_queue(broker.exchange)))


def test_the_operator_reads_dead_letters_only(role_url, broker, declared):
    url = role_url("operator")
    score = broker.topology("score")
    conn = connect(url, "test-operator")
    try:
        channel = conn.channel()
        assert channel.basic_get(score.dead_queue, auto_ack=False)[0] is None  # empty, readable
        channel.queue_purge(score.dead_queue)
        channel.basic_publish("", score.queue, b"{}")  # a dead letter given back
        # messaging verify's reply queue, named by the broker
        channel.queue_declare("", exclusive=True, auto_delete=True)
    finally:
        conn.close()
    _refused(url, lambda channel: channel.basic_get(score.queue))
    _refused(url, lambda channel: channel.queue_delete(score.dead_queue))


def test_the_relay_cannot_read_a_consumers_queue(role_url, broker, declared):
    url = role_url("relay")
    _refused(url, lambda channel: channel.basic_get(broker.topology("score").queue))
    _refused(url, lambda channel: channel.queue_delete(broker.topology("score").queue))


def test_the_probe_only_connects(role_url, broker, declared):
    url = role_url("probe")
    connect(url, "test-probe").close()
    _refused(url, lambda channel: channel.basic_get(broker.topology("score").dead_queue))


class Flaky:
    """Fails each event once (so it goes through a retry queue), then records it."""

    def __init__(self) -> None:
        self.failed: set[str] = set()
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, envelope: Envelope) -> None:
        with self.lock:
            if envelope.entity_id not in self.failed:
                self.failed.add(envelope.entity_id)
                raise RetryableError("once")
            self.seen.append(envelope.entity_id)


def test_relay_and_consumer_work_with_their_roles(producer_db, role_url, broker):
    """From an empty broker (only the exchange, which the relay declares): the consumer declares
    its queues, binds, retries and asks for a replay with its role; the relay publishes."""
    relay_url, score_url = role_url("relay"), role_url("score")
    relay = Relay(
        RelaySettings(
            database_url=producer_db,
            amqp_url=relay_url,
            exchange=broker.exchange,
            poll_interval=0.5,
        )
    )
    flaky = Flaky()
    topology = broker.topology("score")
    consumer = Consumer(ConsumerSettings(amqp_url=score_url, topology=topology), flaky)
    with running(relay):
        wait_until(lambda: _exchange_exists(broker), what="the relay declared the exchange")
        with running(consumer):
            wait_until(consumer.attached.is_set, what="consumer attached with its role")
            with psycopg.connect(producer_db) as conn, conn.cursor() as cur:
                Outbox("test").add(cur, event_type="thing.created", entity_id="e1", data={})
            wait_until(lambda: flaky.seen == ["e1"], what="the event, after one retry")
    conn = connect(relay_url, "test-relay")
    try:
        declare_requests(conn, broker.exchange)  # the relay's replay server declares it
    finally:
        conn.close()
    request_replay(score_url, broker.exchange, topology.queue, "test-request")
    assert broker.depth(requests_queue(broker.exchange)) == 1


def _exchange_exists(broker) -> bool:
    conn = connect(broker.amqp_url, "test-look")
    try:
        conn.channel().exchange_declare(broker.exchange, passive=True)
        return True
    except ChannelClosedByBroker:
        return False
    finally:
        if conn.is_open:
            conn.close()


@contextmanager
def management_api() -> Iterator[tuple[str, list[tuple[str, str, dict]]]]:
    """A stand-in for RabbitMQ's management API that records each PUT."""
    calls: list[tuple[str, str, dict]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append((self.path, self.headers["Authorization"], body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", calls
    finally:
        server.shutdown()
        server.server_close()


def test_broker_user_makes_each_roles_user_with_its_permissions(monkeypatch, capsys):
    monkeypatch.setenv("EVENTS_EXCHANGE", "entity-changes")
    monkeypatch.setenv("RABBITMQ_ADMIN_USER", "admin")
    monkeypatch.setenv("RABBITMQ_ADMIN_PASSWORD", "secret")
    for role in ("relay", "score", "notifier", "operator", "probe"):
        monkeypatch.setenv(
            f"{role.upper()}_AMQP_URL", f"amqp://{role}:pw-{role}@rabbitmq:5672/%2F,amqp://x:y@b/"
        )
    with management_api() as (base, calls):
        monkeypatch.setenv("RABBITMQ_MANAGEMENT_URL", base)
        assert (
            main(
                [
                    "broker-user",
                    "--consumers",
                    "score,notifier",
                    "relay",
                    "score",
                    "notifier",
                    "operator",
                    "probe",
                ]
            )
            == 0
        )
    users = {path: body for path, _, body in calls if path.startswith("/api/users/")}
    assert users["/api/users/score"] == {"password": "pw-score", "tags": ""}
    granted = {path: body for path, _, body in calls if path.startswith("/api/permissions/")}
    assert set(granted) == {
        f"/api/permissions/%2F/{role}"
        for role in ("relay", "score", "notifier", "operator", "probe")
    }
    score = granted["/api/permissions/%2F/score"]
    assert score == permissions("score", "entity-changes", CONSUMERS)
    assert ".*" not in json.dumps(granted)
    assert not re.fullmatch(score["write"], "entity-changes")  # no forged events
    assert not re.fullmatch(score["read"], "notifier.entity-changes")  # nor the notifier's
    assert re.fullmatch(score["read"], "score.entity-changes.retry.5s")
    relay = granted["/api/permissions/%2F/relay"]
    assert re.fullmatch(relay["write"], "entity-changes")
    assert re.fullmatch(relay["read"], "entity-changes.replay-requests")
    operator = granted["/api/permissions/%2F/operator"]
    assert re.fullmatch(operator["read"], "notifier.entity-changes.dead")
    assert not re.fullmatch(operator["read"], "notifier.entity-changes")
    assert {auth for _, auth, _ in calls} == {"Basic YWRtaW46c2VjcmV0"}
    assert "role score" in capsys.readouterr().out


def test_broker_user_refuses_an_unknown_role(monkeypatch, capsys):
    monkeypatch.setenv("EVENTS_EXCHANGE", "entity-changes")
    assert main(["broker-user", "--consumers", "score", "everything"]) == 2
    assert "no role everything" in capsys.readouterr().err
