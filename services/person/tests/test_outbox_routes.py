"""GET /outbox and GET /outbox/history: the outbox as operators (the console) read it, through
the person API instead of the person database; `admin` scope."""

from __future__ import annotations

import json

import psycopg
import pytest
from messaging import Relay, RelaySettings
from messaging.connection import connect
from messaging.testing import running, wait_until
from person.app import create_app
from servicekit.auth import digest

PERSON = {"name": "Ana", "address": "Recife", "date_of_birth": "1990-04-12"}
ANA, BEA = "11111111111", "22222222222"


@pytest.fixture
def client(config, pg_store):
    return create_app(config, store=pg_store).test_client()


def register(client, cpf: str, request_id: str) -> None:
    answer = client.post(
        "/person", json={**PERSON, "cpf": cpf}, headers={"X-Request-Id": request_id}
    )
    assert answer.status_code == 201, answer.json


@pytest.mark.integration
def test_the_outbox_shows_its_backlog_what_the_relay_published_and_the_parked_rows(
    client, person_db, broker
):
    register(client, ANA, "req-ana")
    assert (
        client.post(f"/person/{ANA}/income", json={"type": "rent", "value": 10}).status_code == 201
    )
    register(client, BEA, "req-bea")
    waiting = client.get("/outbox").json
    assert (waiting["backlog"], waiting["published"], waiting["parked_count"]) == (3, 0, 0)
    assert waiting["oldest_age_seconds"] >= 0 and waiting["last_published_at"] is None
    with psycopg.connect(person_db) as conn:  # as the relay parks a row the broker refused
        conn.execute(
            "UPDATE messaging_outbox SET parked_at = now(), parked_reason = 'frame too large' "
            "WHERE entity_id = %s",
            (BEA,),
        )

    conn = connect(broker.amqp_url, "test-watch")
    try:
        broker.topology("watch").declare(conn)  # bound before the relay publishes (mandatory)
    finally:
        conn.close()
    relay = Relay(RelaySettings(person_db, broker.amqp_url, broker.exchange, "person"))
    with running(relay):
        status = wait_until(
            # Both counts: the route reads the backlog and the relay's count in two statements.
            lambda: (s := client.get("/outbox").json)["published"] == 2 and s["backlog"] == 0 and s,
            what="published",
        )

    assert (status["backlog"], status["oldest_age_seconds"]) == (0, 0)
    assert status["last_published_at"] is not None
    assert status["parked_count"] == 1
    [parked] = status["parked"]
    assert (parked["event_type"], parked["entity_id"], parked["entity_version"]) == (
        "person.created",
        BEA,
        1,
    )
    assert (parked["parked_reason"], parked["superseded_by"]) == ("frame too large", None)
    counted_only = client.get("/outbox", query_string={"parked": 0}).json
    assert (counted_only["parked"], counted_only["parked_count"]) == ([], 1)


@pytest.mark.integration
def test_the_history_of_a_person_holds_their_events_and_their_items_oldest_first(client):
    register(client, ANA, "req-ana")
    item = client.post(f"/person/{ANA}/debt", json={"value": 5}, headers={"X-Request-Id": "debt"})
    register(client, BEA, "req-bea")

    answer = client.get("/outbox/history", query_string={"cpf": "111.111.111-11"})

    assert answer.status_code == 200, answer.json
    events = answer.json["events"]
    assert [(e["event_type"], e["entity_id"]) for e in events] == [
        ("person.created", ANA),
        ("debt.created", item.json["id"]),
    ]
    assert [e["correlation_id"] for e in events] == ["req-ana", "debt"]
    assert events[0]["id"] < events[1]["id"] and events[0]["published_at"] is None
    by_request = client.get("/outbox/history", query_string={"correlation_id": "req-bea"}).json
    assert [e["entity_id"] for e in by_request["events"]] == [BEA]
    limited = client.get("/outbox/history", query_string={"cpf": ANA, "limit": 1}).json
    assert len(limited["events"]) == 1


@pytest.mark.unit
@pytest.mark.parametrize(
    ("query", "field"),
    [({}, "cpf"), ({"cpf": "abc"}, "cpf"), ({"cpf": ANA, "limit": "0"}, "limit")],
    ids=["neither", "not-a-cpf", "limit"],
)
def test_a_history_without_a_person_or_request_or_with_a_bad_one_is_422(config, query, field):
    from person.memory import MemoryStore

    client = create_app(config, store=MemoryStore()).test_client()
    answer = client.get("/outbox/history", query_string=query)
    assert answer.status_code == 422, answer.json
    assert field in answer.json["errors"]


@pytest.mark.unit
def test_the_outbox_routes_need_the_admin_scope(config):
    from person.memory import MemoryStore

    keys = {"mk_reader": ["person:read"], "mk_operator": ["admin"]}
    app = create_app(
        config.model_copy(update={"api_keys": json.dumps({digest(k): s for k, s in keys.items()})}),
        store=MemoryStore(),
    )
    client = app.test_client()
    for path in ("/outbox", f"/outbox/history?cpf={ANA}"):
        assert client.get(path).status_code == 401
        refused = client.get(path, headers={"Authorization": "Bearer mk_reader"})
        assert refused.status_code == 403 and 'scope="admin"' in refused.headers["WWW-Authenticate"]
        assert client.get(path, headers={"Authorization": "Bearer mk_operator"}).status_code == 200
