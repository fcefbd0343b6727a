"""Operations on the running stack: rebuild or heal a read model, replay by hand, metrics."""

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


def register(stack, first: int, count: int) -> None:
    for n in range(first, first + count):
        cpf = str(n)
        person = {"cpf": cpf, "name": "R", "address": "a", "date_of_birth": "1990-01-01"}
        assert stack.call("POST", "person", "/person", person)[0] == 201
        body = {"type": "rent", "value": 100 + n % 1000}
        assert stack.call("POST", "person", f"/person/{cpf}/income", body)[0] == 201


def score_store(stack) -> ScoreStore:
    env = stack.env
    return ScoreStore(redis.Redis.from_url(env["SCORE_REDIS_URL"]), env["SCORE_KEY_PREFIX"])


def scores_match(stack, store: ScoreStore) -> bool:
    expected = expected_scores(stack.env["PERSON_DATABASE_URL"])
    return all((got := store.read(cpf)) and got.score == s for cpf, s in expected.items())


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
    client = store.client
    lost = 0
    for key in client.scan_iter(match=f"{stack.env['SCORE_KEY_PREFIX']}*", count=1000):
        lost += client.unlink(key)  # what a FLUSHDB or a restart without persistence does
    assert lost > 0 and store.read("72000") is None

    wait_until(lambda: says(stack, "rebuilding"), what="/ready saying rebuilding")
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


def messaging(stack, *args: str) -> subprocess.CompletedProcess:
    env = {**stack.env, "DATABASE_URL": stack.env["PERSON_DATABASE_URL"]}
    return subprocess.run(
        [str(Path(sys.executable).parent / "messaging"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def welcomes(stack) -> dict[str, int]:
    """Welcome e-mails recorded and sent per CPF."""
    with psycopg.connect(stack.env["NOTIFIER_DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT cpf, count(*) FROM deliveries WHERE kind = 'welcome' AND status = 'sent' "
            "GROUP BY cpf"
        ).fetchall()
    return dict(rows)


def test_read_models_that_lost_part_of_their_stores_find_it_and_repair_it(stack):
    """Keys of the score's Redis and rows of the notifier's view deleted by hand come back by
    themselves within two verifications (VERIFY_SECONDS=3 here) and a replay, with no second
    e-mail; `messaging verify` shows the difference before and none after."""
    cpfs = [str(n) for n in range(76_000, 76_012)]
    for cpf in cpfs:
        person = {"cpf": cpf, "name": "V", "address": "a", "date_of_birth": "1990-01-01"}
        person["email"] = f"v{cpf}@example.com"
        assert stack.call("POST", "person", "/person", person)[0] == 201
        asset = {"type": "car", "value": 500}
        assert stack.call("POST", "person", f"/person/{cpf}/asset", asset)[0] == 201
    store = score_store(stack)
    wait_until(lambda: scores_match(stack, store), what="the scores")
    wait_until(lambda: all(welcomes(stack).get(c) == 1 for c in cpfs), what="every welcome")
    exchange = stack.env["EVENTS_EXCHANGE"]
    score_queue, view_queue = (
        Topology("score", exchange).queue,
        Topology("notifier", exchange).queue,
    )
    assert messaging(stack, "verify", score_queue).returncode == 0

    prefix = stack.env["SCORE_KEY_PREFIX"]
    lost = cpfs[:3]
    store.client.unlink(*(f"{prefix}person:{cpf}" for cpf in lost))
    with psycopg.connect(stack.env["NOTIFIER_DATABASE_URL"]) as conn:
        conn.execute("DELETE FROM users WHERE cpf = ANY(%s)", (cpfs[3:6],))
    before = messaging(stack, "verify", score_queue)
    assert before.returncode == 1, before.stdout + before.stderr
    assert all(f"{cpf}: published v1, held -" in before.stdout for cpf in lost), before.stdout
    assert all(stack.call("GET", "score", f"/{cpf}/score")[0] == 404 for cpf in lost)

    wait_until(lambda: scores_match(stack, store), timeout=60, what="the lost scores back")
    for cpf in cpfs[3:6]:
        wait_until(
            lambda c=cpf: stack.call("GET", "notifier", f"/users/{c}")[0] == 200,
            timeout=60,
            what=f"the view of {cpf} back",
        )
    for queue in (score_queue, view_queue):
        after = messaging(stack, "verify", queue)
        assert after.returncode == 0 and "matches the producer" in after.stdout, after.stdout
    for host in ("score", "notifier"):  # as the replicas' next reports say
        wait_until(
            lambda h=host: metric(stack, h, "read_model_repairs_total") >= 1,
            what=f"the {host}'s repairs counted",
        )
    assert all(welcomes(stack).get(c) == 1 for c in cpfs)  # a repair sends no second welcome
