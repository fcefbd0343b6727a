"""Through Traefik: the item cap answers 422 in the contract's shape, and the stack `make up`
starts prunes the development mailbox and the read models' tombstones by itself; the digests
still match the producer's, and what a late older event brings back after that is mended."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pika
import psycopg
import pytest
from messaging.publisher import event_properties
from messaging.testing import wait_until
from messaging.topology import Topology
from stack_reads import score_store

pytestmark = pytest.mark.e2e

CPF = "52998224725"
ITEM = {"type": "salary", "value": 1}


@pytest.fixture(scope="module")
def stack(start_stack):
    return start_stack(
        ITEMS_PER_PERSON_MAX="3",
        MAILBOX_RETENTION_DAYS="0.0001",  # about 9 seconds
        TOMBSTONE_RETENTION_DAYS="0.0001",
        RETENTION_INTERVAL_SECONDS="1",
        VERIFY_SECONDS="5",
    )


def register(stack, cpf: str, email: str | None = None) -> None:
    person = {"cpf": cpf, "name": "Ana", "address": "Recife", "date_of_birth": "1990-04-12"}
    status, _, _ = stack.call("POST", "person", "/person", {**person, "email": email})
    assert status == 201


def test_an_item_past_the_cap_is_422_with_message_and_errors(stack):
    register(stack, CPF)
    for kind in ("income", "asset", "debt"):
        status, _, _ = stack.call("POST", "person", f"/person/{CPF}/{kind}", ITEM)
        assert status == 201

    status, body, headers = stack.call("POST", "person", f"/person/{CPF}/income", ITEM)

    assert status == 422
    assert headers["Content-Type"].startswith("application/json")
    assert set(body) == {"message", "errors"}
    assert "ITEMS_PER_PERSON_MAX" in body["errors"]["items"][0]
    _, person, _ = stack.call("GET", "person", f"/person/{CPF}")
    assert len(person["incomes"]) + len(person["assets"]) + len(person["debts"]) == 3


def test_the_mailbox_forgets_an_e_mail_after_its_retention(stack):
    register(stack, "39053344705", "bia@example.com")

    def mails() -> list:
        status, box, _ = stack.call("GET", "notifier", "/mailbox?to=bia@example.com")
        assert status == 200
        return box["messages"]

    wait_until(mails, timeout=60, what="the welcome e-mail")
    wait_until(lambda: mails() == [], timeout=60, what="the e-mail pruned")


def verify(stack, service: str) -> subprocess.CompletedProcess:
    """`messaging verify` of a read model's queue, as an operator runs it."""
    env = {**stack.env, "DATABASE_URL": stack.env["PERSON_DATABASE_URL"]}
    queue = Topology(service, stack.env["EVENTS_EXCHANGE"]).queue
    return subprocess.run(
        [str(Path(sys.executable).parent / "messaging"), "verify", queue],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_tombstones_are_pruned_the_digests_still_match_and_a_late_event_is_mended(stack):
    cpf = "70000000001"
    register(stack, cpf, "tomb@example.com")
    status, item, _ = stack.call("POST", "person", f"/person/{cpf}/income", ITEM)
    assert status == 201
    wait_until(lambda: stack.call("GET", "score", f"/{cpf}/score")[0] == 200, what="the score")
    wait_until(lambda: stack.call("GET", "notifier", f"/users/{cpf}")[0] == 200, what="the view")
    with psycopg.connect(stack.env["PERSON_DATABASE_URL"]) as conn:
        created = conn.execute(
            "SELECT body, event_id::text, event_type FROM messaging_outbox "
            "WHERE entity = 'person' AND entity_id = %s AND entity_version = 1",
            (cpf,),
        ).fetchone()
    assert stack.call("DELETE", "person", f"/person/{cpf}")[0] == 204

    store = score_store(stack)
    tombstones = [store.person_key(cpf), store.item_key(item["id"])]

    def view_row() -> bool:
        with psycopg.connect(stack.env["NOTIFIER_DATABASE_URL"]) as conn:
            return bool(conn.execute("SELECT 1 FROM users WHERE cpf = %s", (cpf,)).fetchone())

    wait_until(lambda: store.client.exists(*tombstones) == 2, what="the score's tombstones")
    wait_until(lambda: not store.client.exists(*tombstones), timeout=60, what="them pruned")
    wait_until(lambda: not view_row(), timeout=60, what="the view's tombstone pruned")
    for service in ("score", "notifier"):
        checked = verify(stack, service)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "matches the producer" in checked.stdout

    # A late copy of the person's first event (a dead letter sent again, weeks later): nothing
    # holds the version back now, so it brings the person back, until verification finds the
    # bucket differing and the producer's repair replays the deletion.
    body, event_id, event_type = created
    connection = pika.BlockingConnection(pika.URLParameters(stack.env["AMQP_URL"]))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        queue = Topology("score", stack.env["EVENTS_EXCHANGE"]).queue
        channel.basic_publish("", queue, body, event_properties(event_id, event_type, None))
    finally:
        connection.close()
    wait_until(lambda: store.client.exists(tombstones[0]), what="the late event applied")
    wait_until(
        lambda: store.client.hget(tombstones[0], "deleted") == b"1",
        timeout=90,
        what="the deletion replayed by verification's repair",
    )
    assert stack.call("GET", "score", f"/{cpf}/score")[0] == 404
