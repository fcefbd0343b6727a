"""Integration: the replay server serves only its targets, not too often, and nothing a request
carries or a replay meets ends it. Against the real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import json
import logging
import struct
import time
import uuid

import pika
import pika.data
import psycopg
import pytest
from messaging import Outbox
from messaging.connection import connect
from messaging.replay import COMPLETED_TYPE, MAX_REQUEST_BYTES, REQUEST_HEADER, declare_requests
from messaging.replay_server import NOT_A_REQUEST, UNKNOWN_TARGET, ReplayServer
from messaging.testing import running, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def outbox_of_three(producer_db) -> str:
    with psycopg.connect(producer_db) as conn:
        for entity_id in ("a", "b", "c"):
            with conn.transaction(), conn.cursor() as cur:
                Outbox("test").add(cur, event_type="thing.created", entity_id=entity_id, data={})
    return producer_db


def work_queue(broker, service: str) -> str:
    """A consuming service's work queue of this test's own, declared."""
    topology = broker.topology(service)
    conn = connect(broker.amqp_url, "test-declare")
    try:
        topology.declare(conn)
    finally:
        conn.close()
    return topology.queue


def ask(broker, body: bytes | dict, properties: pika.BasicProperties | None = None) -> None:
    """Publish a replay request (or anything else) to the requests queue, confirmed."""
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = connect(broker.amqp_url, "test-ask")
    try:
        queue = declare_requests(conn, broker.exchange)
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue, raw, properties or pika.BasicProperties())
    finally:
        conn.close()


class Received:
    """What reached a queue: taken off it on each look and kept here."""

    def __init__(self, broker, queue: str) -> None:
        self.broker, self.queue = broker, queue
        self.messages: list[tuple[pika.BasicProperties, bytes]] = []

    def take(self) -> Received:
        conn = connect(self.broker.amqp_url, "test-take")
        try:
            channel = conn.channel()
            while True:
                method, properties, body = channel.basic_get(self.queue, auto_ack=True)
                if method is None:
                    return self
                self.messages.append((properties, body))
        finally:
            conn.close()

    @property
    def completed(self) -> list[str]:
        return [
            json.loads(body)["request_id"]
            for props, body in self.messages
            if props.type == COMPLETED_TYPE
        ]

    @property
    def events(self) -> list[pika.BasicProperties]:
        return [props for props, _ in self.messages if props.type != COMPLETED_TYPE]


def test_a_request_for_a_queue_that_is_not_a_target_publishes_nothing_to_it(
    outbox_of_three, broker
):
    model, spy = work_queue(broker, "model"), work_queue(broker, "spy")
    server = ReplayServer(outbox_of_three, broker.amqp_url, broker.exchange, [model])
    ask(broker, {"queue": spy, "request_id": "steal"})
    ask(broker, {"queue": model, "request_id": "heal"})
    received = Received(broker, model)
    with running(server):
        wait_until(lambda: received.take().completed == ["heal"], what="the target served")
    assert server.refused == {UNKNOWN_TARGET: 1}
    assert broker.depth(spy) == 0
    assert len(received.events) == 3


def test_a_burst_of_requests_for_one_target_runs_one_replay_that_answers_them_all(
    outbox_of_three, broker
):
    model = work_queue(broker, "model")
    burst = [f"burst-{n}" for n in range(6)]
    for request_id in [*burst, "burst-0", "burst-1"]:  # two asked twice
        ask(broker, {"queue": model, "request_id": request_id})
    server = ReplayServer(
        outbox_of_three, broker.amqp_url, broker.exchange, [model], min_interval=2.0
    )
    received = Received(broker, model)
    with running(server):
        wait_until(
            lambda: set(received.take().completed) == set(burst) and server.served == 6,
            timeout=30,
            what="every request of the burst answered",
        )
        assert server.replays <= 2  # the first may have been taken alone
        assert len(received.events) == 3 * server.replays
        answered_at = time.monotonic()

        ask(broker, {"queue": model, "request_id": "later"})
        wait_until(lambda: "later" in received.take().completed, what="the later request")
        assert time.monotonic() - answered_at >= 2.0 - 0.1  # it waited for the interval
    assert sorted(received.completed) == sorted([*burst, "later"])  # each answered once
    assert {props.headers[REQUEST_HEADER] for props in received.events} <= {*burst, "later"}


class Undecodable:
    """A header value the broker accepts and pika cannot decode (a timestamp past year 9999)."""


def publish_undecodable(broker, monkeypatch) -> None:
    encode = pika.data.encode_value

    def encode_value(pieces: list, value: object) -> int:
        if isinstance(value, Undecodable):
            pieces.append(struct.pack(">cQ", b"T", 2**62))
            return 9
        return encode(pieces, value)

    with monkeypatch.context() as patched:
        patched.setattr(pika.data, "encode_value", encode_value)
        ask(broker, b"{}", pika.BasicProperties(headers={"when": Undecodable()}))


HOSTILE = [
    b'{"queue": "' + b"q" * MAX_REQUEST_BYTES + b'", "request_id": "r"}',
    b"not json",
    b"\xff\xfe\x00\x00junk",
    '{"queue": "\ud800"}'.encode(errors="surrogatepass"),
    b"[" * 3000,
    b"[]",
    b"null",
    b'{"queue": 5, "request_id": "r"}',
    b'{"queue": "", "request_id": "r"}',
    b'{"request_id": "r"}',
]


def test_hostile_requests_are_refused_with_a_reason_each_and_the_server_goes_on(
    outbox_of_three, broker, caplog
):
    model = work_queue(broker, "model")
    bad_ids = ["é", "a b", "x" * 129, ["list"], None]
    hostile = [
        *HOSTILE,
        *(json.dumps({"queue": model, "request_id": rid}).encode() for rid in bad_ids),
    ]
    for body in hostile:
        ask(broker, body)
    odd = pika.BasicProperties(
        type=COMPLETED_TYPE,
        content_type="text/html",
        priority=9,
        headers={"x-death": "junk", "nested": {"a": [1, {"b": None}]}, "": b"\x00"},
    )
    ask(broker, b"\x00\x01", odd)
    ask(broker, {"queue": model, "request_id": "good"}, odd)  # odd properties do not matter
    server = ReplayServer(outbox_of_three, broker.amqp_url, broker.exchange, [model])
    received = Received(broker, model)
    caplog.set_level(logging.WARNING, logger="messaging.replay")
    with running(server) as thread:
        wait_until(lambda: received.take().completed == ["good"], what="the good one served")
        assert thread.is_alive()
    assert server.refused == {NOT_A_REQUEST: len(hostile) + 1}
    refusals = [r for r in caplog.records if "refused a replay request" in r.getMessage()]
    assert len(refusals) == len(hostile) + 1  # one line each, with its reason
    assert any("not JSON" in r.getMessage() for r in refusals)
    assert any("request_id" in r.getMessage() for r in refusals)
    assert broker.depth(f"{broker.exchange}.replay-requests") == 0


def test_a_request_the_server_cannot_even_decode_is_dropped_and_the_server_goes_on(
    outbox_of_three, broker, monkeypatch
):
    model = work_queue(broker, "model")
    publish_undecodable(broker, monkeypatch)  # ends the server's connection at each delivery
    server = ReplayServer(outbox_of_three, broker.amqp_url, broker.exchange, [model])
    received = Received(broker, model)

    def asked_and_served() -> bool:
        # A request in flight with the undecodable one is dropped with it, and asked again
        # (as Healing does after re_request_after).
        if received.take().completed:
            return True
        ask(broker, {"queue": model, "request_id": "good"})
        return False

    with running(server) as thread:
        wait_until(asked_and_served, timeout=60, interval=1.0, what="a request served")
        assert thread.is_alive()
    assert set(received.completed) == {"good"}


def test_a_replay_that_fails_is_tried_again_and_other_targets_are_served_meanwhile(
    outbox_of_three, broker, caplog
):
    model = work_queue(broker, "model")
    full = f"full-{uuid.uuid4().hex[:8]}"  # refuses every message until it is made again
    conn = connect(broker.amqp_url, "test-full")
    channel = conn.channel()
    channel.queue_declare(full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    try:
        ask(broker, {"queue": full, "request_id": "blocked"})
        ask(broker, {"queue": model, "request_id": "meanwhile"})
        server = ReplayServer(outbox_of_three, broker.amqp_url, broker.exchange, [full, model])
        caplog.set_level(logging.WARNING, logger="messaging.replay")
        with running(server):
            received = Received(broker, model)
            wait_until(lambda: received.take().completed == ["meanwhile"], what="the other one")
            failed = [r for r in caplog.records if f"replay to {full} failed" in r.getMessage()]
            assert failed and "again in" in failed[0].getMessage()

            channel.queue_delete(full)  # the operator fixes it
            channel.queue_declare(full)
            fixed = Received(broker, full)
            wait_until(
                lambda: fixed.take().completed == ["blocked"], timeout=30, what="served at last"
            )
        assert server.refused == {}
    finally:
        channel.queue_delete(full)
        conn.close()
