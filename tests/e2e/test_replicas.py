"""`make up` with several copies of the consumers, the sender and the relay (honcho concurrency)."""

from __future__ import annotations

import collections
import re

import psycopg
import pytest
import redis
from messaging.testing import wait_until
from score.store import ScoreStore

pytestmark = pytest.mark.e2e

COPIES = {
    "SCORE_CONSUMERS": "3",
    "NOTIFIER_CONSUMERS": "2",
    "NOTIFIER_SENDERS": "2",
    "PERSON_RELAYS": "2",
}


@pytest.fixture(scope="module")
def replicated(start_stack):
    return start_stack(**COPIES)


def heartbeats(stack) -> collections.Counter:
    """Processes of the notifier that beat within 10 s, by process type."""
    with psycopg.connect(stack.env["NOTIFIER_DATABASE_URL"]) as conn:
        return collections.Counter(
            name.partition("@")[0]
            for (name,) in conn.execute(
                "SELECT name FROM heartbeats WHERE seen_at > now() - interval '10 seconds'"
            )
        )


def test_every_copy_runs_beats_and_the_services_are_ready(replicated):
    log = (replicated.run_dir / "stack.log").read_text()
    started = set(re.findall(r"\| ([a-z-]+\.\d+) started", log))
    assert {"score-consumer.1", "score-consumer.2", "score-consumer.3"} <= started
    assert {"notifier-consumer.1", "notifier-consumer.2"} <= started
    assert {"notifier-sender.1", "notifier-sender.2", "person-relay.1", "person-relay.2"} <= started
    store = ScoreStore(
        redis.Redis.from_url(replicated.env["SCORE_REDIS_URL"]), replicated.env["SCORE_KEY_PREFIX"]
    )
    wait_until(lambda: len(store.beacons()) == 3, what="three score consumers beating")
    wait_until(
        lambda: heartbeats(replicated) == {"notifier-consumer": 2, "notifier-sender": 2},
        what="two notifier consumers and two senders beating",
    )
    for host in ("person", "score", "notifier"):
        wait_until(
            lambda h=host: replicated.call("GET", h, "/ready")[0] == 200, what=f"{host} ready"
        )


def test_a_registration_replicates_once_through_the_copies(replicated):
    person = {
        "cpf": "19019019019",
        "name": "Réplica",
        "address": "Rua da Aurora, 19",
        "date_of_birth": "1990-01-19",
        "email": "replica@example.com",
    }
    assert replicated.call("POST", "person", "/person", person)[0] == 201
    income = {"type": "salary", "value": "5000.00"}
    assert replicated.call("POST", "person", "/person/19019019019/income", income)[0] == 201
    wait_until(
        lambda: replicated.call("GET", "score", "/19019019019/score")[1].get("score") == 100,
        what="the score",
    )

    def mails() -> list:
        _, found, _ = replicated.call("GET", "notifier", "/mailbox?to=replica@example.com")
        return found["messages"]

    wait_until(mails, what="the welcome e-mail")
    _, user, _ = replicated.call("GET", "notifier", "/users/19019019019")
    assert user["welcome_email"]["status"] == "sent"
    assert len(mails()) == 1  # two senders, one e-mail
