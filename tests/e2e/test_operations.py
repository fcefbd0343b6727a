"""Operations on the running stack: rebuild a wiped read model with `messaging replay`."""

from __future__ import annotations

import subprocess
import sys
import threading
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

import psycopg
import pytest
import redis
from messaging.testing import wait_until
from messaging.topology import Topology
from prometheus_client.parser import text_string_to_metric_families
from score.store import ScoreStore

pytestmark = pytest.mark.e2e

PEOPLE = 60


def expected_scores(person_db: str) -> dict[str, int]:
    def floor(value: Decimal, step: int) -> int:
        return int((value / step).to_integral_value(rounding=ROUND_FLOOR))

    with psycopg.connect(person_db) as conn:
        scores = {cpf: 0 for (cpf,) in conn.execute("SELECT cpf FROM person")}
        for cpf, kind, value in conn.execute("SELECT cpf, kind, value FROM item"):
            step = {"income": 50, "asset": 20, "debt": 20}[kind]
            scores[cpf] += -floor(value, step) if kind == "debt" else floor(value, step)
    return scores


def test_a_wiped_score_model_is_rebuilt_by_replay_while_writes_continue(stack):
    for n in range(PEOPLE):
        cpf = str(70_000 + n)
        person = {"cpf": cpf, "name": "R", "address": "a", "date_of_birth": "1990-01-01"}
        assert stack.call("POST", "person", "/person", person)[0] == 201
        body = {"type": "rent", "value": 100 + n}
        assert stack.call("POST", "person", f"/person/{cpf}/income", body)[0] == 201
    env = stack.env
    store = ScoreStore(redis.Redis.from_url(env["SCORE_REDIS_URL"]), env["SCORE_KEY_PREFIX"])

    def matches() -> bool:
        expected = expected_scores(env["PERSON_DATABASE_URL"])
        return all((got := store.read(cpf)) and got.score == s for cpf, s in expected.items())

    wait_until(matches, what="the scores before the wipe")
    assert store.wipe() > 0
    assert store.read("70000") is None

    stop = threading.Event()

    def keep_writing() -> None:  # live traffic during the rebuild
        n = 0
        while not stop.is_set():
            body = {"value": 20}
            stack.call("POST", "person", f"/person/{70_000 + n % PEOPLE}/debt", body)
            n += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        queue = Topology("score", env["EVENTS_EXCHANGE"]).queue
        replay = subprocess.run(
            [str(Path(sys.executable).parent / "messaging"), "replay", "--to", queue],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert replay.returncode == 0, replay.stderr
        assert "replayed" in replay.stdout
    finally:
        stop.set()
        writer.join(timeout=30)
    wait_until(matches, what="every score rebuilt, the writes during the replay included")


def metric(stack, host: str, name: str, **labels: str) -> float:
    """A sample's value from the service's /metrics, through Traefik (0 when absent)."""
    status, text, _ = stack.call("GET", host, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_follow_the_traffic(stack):
    before = {
        "published": metric(stack, "person", "outbox_published_total"),
        "score": metric(stack, "score", "consumer_messages_total", outcome="applied"),
        "notifier": metric(stack, "notifier", "consumer_messages_total", outcome="applied"),
        "sent": metric(stack, "notifier", "emails", status="sent"),
    }
    for n in range(5):
        person = {
            "cpf": str(80_000 + n),
            "name": "M",
            "address": "a",
            "date_of_birth": "1990-01-01",
            "email": f"m{n}@example.com",
        }
        assert stack.call("POST", "person", "/person", person)[0] == 201
    # five person.created events: published once, applied by each consumer, five e-mails
    wait_until(
        lambda: metric(stack, "person", "outbox_published_total") >= before["published"] + 5,
        what="published",
    )
    for host in ("score", "notifier"):
        wait_until(
            lambda h=host: (
                metric(stack, h, "consumer_messages_total", outcome="applied") >= before[h] + 5
            ),
            what=f"{host} applied",
        )
        assert metric(stack, host, "consumer_handler_seconds_count") > 0
        assert 0 <= metric(stack, host, "read_model_lag_seconds") < 600
    wait_until(
        lambda: metric(stack, "notifier", "emails", status="sent") >= before["sent"] + 5,
        what="e-mails sent",
    )
    assert metric(stack, "person", "outbox_backlog") >= 0
