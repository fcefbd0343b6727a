"""JSON log lines carry the correlation id from the HTTP request and from the envelope."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from flask import Flask
from messaging import Consumer, ConsumerSettings, Envelope
from messaging.testing import running, wait_until
from servicekit import correlation
from servicekit.auth import public
from servicekit.logs import JsonFormatter, bound


class Lines(logging.Handler):
    """Formats each record as it is emitted, on the emitting thread, as a process would."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.unit
def test_a_line_is_json_with_the_bound_id_and_the_error():
    formatter = JsonFormatter()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "broke %s", ("it",), None)
    with bound("req-7"):
        line = json.loads(formatter.format(record))
    assert line["message"] == "broke it" and line["correlation_id"] == "req-7"
    assert line["level"] == "ERROR" and line["logger"] == "x"
    assert "correlation_id" not in json.loads(formatter.format(record))  # unbound again


@pytest.mark.unit
def test_every_line_of_a_request_carries_its_request_id(lines):
    app = Flask("t")

    @app.get("/work")
    @public
    def work():
        logging.getLogger("t.api").info("working")
        return {"ok": True}

    correlation.init_app(app)
    response = app.test_client().get("/work", headers={"X-Request-Id": "req-42"})
    assert response.headers["X-Request-Id"] == "req-42"
    working = [line for line in lines.lines if line["message"] == "working"]
    assert working and working[0]["correlation_id"] == "req-42"


@pytest.mark.integration
def test_consumer_lines_about_a_change_carry_its_correlation_id(broker, lines):
    def handler(envelope: Envelope) -> None:
        logging.getLogger("t.handler").warning("applying %s", envelope.entity_id)

    topology = broker.topology("logs")
    consumer = Consumer(ConsumerSettings(broker.amqp_url, topology), handler)
    with running(consumer):
        wait_until(consumer.attached.is_set, what="attached")

        envelope = Envelope.new(
            event_type="thing.created",
            entity_id="t1",
            entity_version=1,
            data={},
            producer="test",
            correlation_id="req-from-http",
        )
        broker.publish(envelope)
        wait_until(
            lambda: [x for x in lines.lines if x["message"] == "applying t1"], what="the line"
        )
    line = next(x for x in lines.lines if x["message"] == "applying t1")
    assert line["correlation_id"] == "req-from-http"
