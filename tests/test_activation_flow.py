"""Across services, in one process: register with an e-mail, get one welcome e-mail in the
development mailbox, follow its link through the person service, see the view turn active."""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pika
import psycopg
import pytest
from messaging import Relay, RelaySettings, Topology
from messaging.testing import running, wait_until
from notifier.config import NotifierConfig
from notifier.consumer import build
from notifier.sender import Sender
from person.app import create_app as person_app
from person.config import PersonConfig
from psycopg_pool import ConnectionPool

pytestmark = pytest.mark.integration
SECRET = "shared-activation-secret"


@contextlib.contextmanager
def services(person_db: str, notifier_db: str, broker) -> Iterator[tuple[Any, Any, Any]]:
    """The person app (a test client), its relay, and the notifier's consumer and sender (with
    the development mailbox), as their processes build them: (person, store, consumer)."""
    person_config = PersonConfig(
        person_database_url=person_db,
        amqp_url=broker.amqp_url,
        events_exchange=broker.exchange,
        activation_secret=SECRET,
    )
    notifier_config = NotifierConfig(
        notifier_database_url=notifier_db,
        amqp_url=broker.amqp_url,
        events_exchange=broker.exchange,
        activation_secret=SECRET,
        sendgrid_api_key=None,
        public_person_url="http://person.localhost:8000",
        sender_poll_seconds=0.2,
    )
    person = person_app(person_config).test_client()
    with ConnectionPool(notifier_db, min_size=1, max_size=4) as pool:
        consumer, store = build(notifier_config, pool)  # as the process builds it
        broker.topologies.append(consumer.topology)
        relay = Relay(RelaySettings(person_db, broker.amqp_url, broker.exchange, producer="person"))
        with running(consumer), running(relay), running(Sender(store, notifier_config, None)):
            wait_until(consumer.attached.is_set, what="the notifier consumer")
            yield person, store, consumer


def link_in(mail: dict) -> str:
    """The path and query of the activation link in an e-mail."""
    return mail["text"].split("http://person.localhost:8000", 1)[1].split()[0]


def test_welcome_email_link_activates_the_account_and_the_view_follows(
    person_db, notifier_db, broker
):
    with services(person_db, notifier_db, broker) as (person, store, consumer):
        created = person.post(
            "/person",
            json={
                "cpf": "123.456.789-09",
                "name": "Maria",
                "address": "Recife",
                "date_of_birth": "1990-04-12",
                "email": "maria@example.com",
            },
        )
        assert created.status_code == 201
        wait_until(lambda: store.mailbox(10), what="the welcome e-mail")
        redeliver_the_creation_twice(person_db, broker, consumer.topology)
        wait_until(lambda: consumer.stats.consumed >= 3, what="the duplicates handled")

        path = link_in(store.mailbox(10)[0])
        page = person.get(path)
        assert page.status_code == 200 and b"Account activated" in page.data
        wait_until(
            lambda: store.user("12345678909")["status"] == "active",
            what="the view to show the activation",
        )
        assert person.get(path).status_code == 200  # a repeat click: already active
        assert len(store.mailbox(10)) == 1
        assert [d["kind"] for d in store.deliveries(None, 10)] == ["welcome"]
    assert urllib.parse.urlparse(path).path == "/person/12345678909/activate"


def test_a_new_address_is_confirmed_again_and_links_to_the_old_one_confirm_nothing(
    person_db, notifier_db, broker
):
    with services(person_db, notifier_db, broker) as (person, store, _consumer):
        body = {"cpf": "1", "name": "A", "address": "x", "date_of_birth": "1990-01-01"}
        assert person.post("/person", json={**body, "email": "a@example.com"}).status_code == 201
        first = wait_until(lambda: store.mailbox(10, "a@example.com"), what="the welcome")
        old_link = link_in(first[0])
        assert person.get(old_link).status_code == 200
        assert person.get("/person/1").json["status"] == "active"

        changed = person.patch("/person/1", json={"email": "b@example.com"})
        assert changed.status_code == 200 and changed.json["status"] == "pending"
        second = wait_until(lambda: store.mailbox(10, "b@example.com"), what="the new link")
        refused = person.get(old_link)
        assert refused.status_code == 400 and b"another e-mail address" in refused.data
        assert person.get("/person/1").json["status"] == "pending"
        assert person.get(link_in(second[0])).status_code == 200
        assert person.get("/person/1").json["status"] == "active"
        wait_until(lambda: store.user("1")["status"] == "active", what="the view active")

        # a change of letter case is the same address: nothing to confirm
        same = person.patch("/person/1", json={"email": "B@example.com"})
        assert same.json["status"] == "active"
        assert [m["subject"] for m in store.mailbox(10, "a@example.com")] == [first[0]["subject"]]
        assert len(store.mailbox(10, "b@example.com")) == 1
        kinds = sorted((d["kind"], d["to_email"]) for d in store.deliveries(None, 10))
        assert kinds == [("activation", "b@example.com"), ("welcome", "a@example.com")]


def redeliver_the_creation_twice(person_db: str, broker, topology: Topology) -> None:
    with psycopg.connect(person_db) as conn:
        body, event_id = conn.execute(
            "SELECT body, event_id::text FROM messaging_outbox WHERE event_type = 'person.created'"
        ).fetchone()
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for _ in range(2):
            channel.basic_publish(
                "",
                topology.queue,
                body.encode(),
                pika.BasicProperties(message_id=event_id, delivery_mode=2),
            )
    finally:
        connection.close()
