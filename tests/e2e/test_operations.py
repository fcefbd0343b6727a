"""Operations on the running stack: rebuild or heal a read model, replay by hand, metrics."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from messaging.testing import wait_until
from messaging.topology import Topology
from stack_reads import metric, score_store, scores_match

pytestmark = pytest.mark.e2e

PEOPLE = 60


def register(stack, first: int, count: int) -> None:
    for n in range(first, first + count):
        cpf = str(n)
        person = {"cpf": cpf, "name": "R", "address": "a", "date_of_birth": "1990-01-01"}
        assert stack.call("POST", "person", "/person", person)[0] == 201
        body = {"type": "rent", "value": 100 + n % 1000}
        assert stack.call("POST", "person", f"/person/{cpf}/income", body)[0] == 201


def says(stack, status: str) -> bool:
    return stack.call("GET", "score", "/ready")[1]["status"] == status


class LiveWrites:
    """Debts added to the given people from a thread, while a block runs."""

    def __init__(self, stack, first: int, count: int) -> None:
        self.stack, self.first, self.count = stack, first, count
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._write)
        self.written = 0

    def _write(self) -> None:
        while not self.stop.is_set():
            cpf = self.first + self.written % self.count
            self.stack.call("POST", "person", f"/person/{cpf}/debt", {"value": 20})
            self.written += 1

    def __enter__(self) -> LiveWrites:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def test_score_rebuild_wipes_and_rebuilds_the_model_while_writes_continue(stack):
    register(stack, 70_000, PEOPLE)
    store = score_store(stack)
    wait_until(lambda: scores_match(stack, store), what="the scores before the rebuild")
    with LiveWrites(stack, 70_000, PEOPLE) as writes:
        rebuild = subprocess.run(
            [str(Path(sys.executable).parent / "score-rebuild"), "--timeout", "120"],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert rebuild.returncode == 0, rebuild.stdout + rebuild.stderr
        assert "wiped" in rebuild.stdout and "rebuilt" in rebuild.stdout
    assert writes.written > 0
    wait_until(lambda: scores_match(stack, store), what="every score, the live writes included")
    wait_until(lambda: says(stack, "ready"), what="/ready once the beacon saw the rebuild end")


def test_a_score_model_whose_redis_lost_its_data_heals_itself(stack):
    register(stack, 72_000, PEOPLE)
    store = score_store(stack)
    wait_until(lambda: scores_match(stack, store), what="the scores before the loss")
    asked_before = stack.call("GET", "score", "/rebuild")[1]["request_id"]
    client = store.client
    lost: set[str] = set()
    for key in client.scan_iter(match=f"{stack.env['SCORE_KEY_PREFIX']}*", count=1000):
        if client.unlink(key):  # what a FLUSHDB or a restart without persistence does
            lost.add(key.decode() if isinstance(key, bytes) else key)
    # Every person's score was lost (the model may already be healing: a read now could find
    # one written back, as a loaded run did).
    assert {store.person_key(str(cpf)) for cpf in range(72_000, 72_000 + PEOPLE)} <= lost

    # The model asks for a replay of its own (a new generation marker); /ready says `rebuilding`
    # meanwhile, for as long as that takes, which a few people may make shorter than a look.
    wait_until(
        lambda: stack.call("GET", "score", "/rebuild")[1]["request_id"] not in (None, asked_before),
        what="a replay asked for by the model",
    )
    wait_until(lambda: scores_match(stack, store), timeout=60, what="every score back")
    wait_until(lambda: says(stack, "ready"), what="the model ready again")


def test_messaging_replay_sends_the_latest_events_to_one_queue(stack):
    register(stack, 74_000, 5)
    env = {**stack.env, "DATABASE_URL": stack.env["PERSON_DATABASE_URL"]}
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
    store = score_store(stack)
    wait_until(lambda: scores_match(stack, store), what="the scores after the replay")


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
