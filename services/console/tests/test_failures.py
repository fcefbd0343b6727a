"""The console's dead-letter pages against the real RabbitMQ and PostgreSQL: a page reads one
window of a dead queue and says how much of it that is; actions reach past it."""

from __future__ import annotations

import json
import re

import pika
import pytest
from console.app import create_app
from console.config import ConsoleConfig
from messaging.connection import connect
from messaging.publisher import ConfirmedPublisher, Outgoing
from messaging.topology import Topology

pytestmark = pytest.mark.integration

WINDOW, DEAD = 50, 120
CLOSED = "http://127.0.0.1:9"  # the services' APIs: not running here


@pytest.fixture
def score(broker) -> Topology:
    topology = broker.topology("score")
    conn = connect(broker.amqp_url, "test-declare")
    try:
        topology.declare(conn)
    finally:
        conn.close()
    return topology


@pytest.fixture
def client(broker, make_database, score, person_api):
    config = ConsoleConfig(
        console_database_url=make_database("console"),
        amqp_url=broker.amqp_url,
        events_exchange=broker.exchange,
        console_dlq_window=WINDOW,
        person_api_url=person_api.url,  # the outbox the journey follows
        score_api_url=CLOSED,
        notifier_api_url=CLOSED,
        api_keys=None,
    )
    return create_app(config).test_client()


def kill(broker, topology: Topology, count: int) -> None:
    """`count` dead letters in the topology's dead queue: m-0 ... (two reasons)."""
    messages = [
        Outgoing(
            topology.dead_queue,
            json.dumps({"event_type": "person.created", "entity_id": f"{n:011d}"}).encode(),
            pika.BasicProperties(
                message_id=f"m-{n}",
                delivery_mode=2,
                headers={
                    "x-exception-type": "DecodeError" if n % 2 else "PermanentError",
                    "x-dead-reason": f"reason {n % 2}",
                    "x-dead-at": f"2026-12-07T10:00:{n % 60:02d}+00:00",
                },
            ),
        )
        for n in range(count)
    ]
    ConfirmedPublisher(broker.amqp_url, "", "test-kill").publish_all(messages)


def csrf(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def test_the_failures_page_groups_one_window_and_says_how_many_there_are(client, broker, score):
    kill(broker, score, DEAD)
    page = client.get("/failures").get_data(as_text=True)
    assert f"grouped here: the first {WINDOW} of {DEAD}" in page
    counts = [int(n) for n in re.findall(r"</td><td>(\d+)</td><td>2026", page)]
    assert sum(counts) == WINDOW and len(counts) == 2
    assert broker.depth(score.dead_queue) == DEAD  # looking takes nothing away


def test_a_group_page_shows_its_window_and_a_replay_reaches_past_it(client, broker, score):
    kill(broker, score, DEAD)
    group = "DecodeError: reason …"
    page = client.get("/failures/group", query_string={"queue": score.dead_queue, "group": group})
    text = page.get_data(as_text=True)
    assert f"among the first {WINDOW} of {DEAD} dead letters" in text
    assert len(re.findall(r"<strong>m-\d+</strong>", text)) == WINDOW // 2
    answer = client.post(
        "/failures/replay",
        data={"csrf": csrf(text), "queue": score.dead_queue, "id": ["m-1", "m-101", "m-999"]},
    )
    assert answer.status_code == 302
    assert "replay: 2 of 3; 1 not found among the 120 scanned" in (
        client.get(answer.headers["Location"]).get_data(as_text=True)
    )
    assert broker.depth(score.queue) == 2 and broker.depth(score.dead_queue) == DEAD - 2


def test_the_journey_finds_a_dead_letter_about_the_person_in_its_window(
    client, broker, score, person_api
):
    cpf = f"{7:011d}"
    person_api.add("person.created", cpf)
    kill(broker, score, DEAD)
    text = client.get("/journey", query_string={"q": cpf}).get_data(as_text=True)
    assert f"Dead letters searched in <code>{score.dead_queue}</code>: the first {WINDOW}" in text
    assert 'name="id" value="m-7"' in text  # its dead letter, with the button that replays it
    assert text.count('name="id" value="m-') == 1
