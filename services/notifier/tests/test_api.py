"""The notifier API over a real database."""

from __future__ import annotations

import json

import pytest
from messaging.consumer import ConsumerStats
from notifier.app import create_app
from notifier.email import composer_for
from servicekit.auth import digest

pytestmark = pytest.mark.integration
ADMIN: dict[str, str] = {}  # API keys are off here (tests/test_security.py covers them)


@pytest.fixture
def client(config, store):
    return create_app(config.model_copy(update={"sendgrid_api_key": None}), store).test_client()


def test_user_view_shows_the_welcome_email_state(person_event, client, view):
    view(person_event("1", name="Ana <b>"))
    body = client.get("/users/1").json
    assert body["name"] == "Ana <b>" and body["status"] == "pending"
    assert body["welcome_email"]["status"] == "pending"


def test_user_without_email_has_no_welcome_and_unknown_user_is_404(person_event, client, view):
    view(person_event("2", name="Ana <b>", email=None))
    assert client.get("/users/2").json["welcome_email"] is None
    assert client.get("/users/404").status_code == 404


def test_mailbox_lists_emails_with_their_links_and_serves_the_html(
    person_event, client, view, store, config
):
    view(person_event("3", name="Ana O'Neil"))
    store.deliver_due_to_mailbox(1, 300, config.email_from, composer_for(config).for_delivery)
    messages = client.get("/mailbox").json["messages"]
    assert len(messages) == 1
    assert messages[0]["links"][0].startswith("http://person.test/person/3/activate?token=")
    page = client.get(f"/mailbox/{messages[0]['id']}")
    assert page.content_type.startswith("text/html")
    assert b"Ana O&#39;Neil" in page.data  # the name is escaped in the HTML
    assert client.get("/mailbox/999999").status_code == 404


def test_mailbox_is_off_when_sendgrid_is_configured(config, store):
    client = create_app(config, store).test_client()
    assert client.get("/mailbox").status_code == 404


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic YWRtaW4="}]
)
def test_with_api_keys_the_admin_endpoints_need_an_admin_key(config, store, headers):
    keys = json.dumps({digest("mk_admin"): ["admin"]})
    client = create_app(config.model_copy(update={"api_keys": keys}), store).test_client()
    response = client.get("/deliveries?status=failed", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.post("/deliveries/1/retry", headers=headers).status_code == 401
    admin = {"Authorization": "Bearer mk_admin"}
    assert client.get("/deliveries?status=failed", headers=admin).status_code == 200


def test_the_mailbox_is_closed_in_production(config, store):
    keys = json.dumps({digest("mk_admin"): ["admin"]})
    production = config.model_copy(
        update={"app_env": "production", "sendgrid_api_key": None, "api_keys": keys}
    )
    assert not production.mailbox_open
    client = create_app(production, store).test_client()
    assert client.get("/mailbox", headers={"Authorization": "Bearer mk_admin"}).status_code == 404


def test_the_mailbox_filters_by_recipient_and_its_links_ignore_the_host_header(
    person_event, client, view, store, config
):
    for cpf, email in (("61", "one@example.com"), ("62", "two@example.com")):
        view(person_event(cpf, email=email))
    store.deliver_due_to_mailbox(10, 300, config.email_from, composer_for(config).for_delivery)
    box = client.get("/mailbox?to=TWO@example.com", headers={"Host": "evil.example"}).json
    assert [m["to"] for m in box["messages"]] == ["two@example.com"]
    assert box["messages"][0]["html_url"].startswith("http://notifier.localhost:")
    assert "evil" not in json.dumps(box)


def test_failed_deliveries_can_be_listed_and_retried(person_event, client, view, store):
    view(person_event("4", name="Ana <b>"))
    claimed = store.claim_due(1, 300)[0]
    assert store.mark_failed(claimed, "HTTP 400: bad sender")
    listed = client.get("/deliveries?status=failed", headers=ADMIN).json["deliveries"]
    assert [(d["id"], d["last_error"]) for d in listed] == [(claimed["id"], "HTTP 400: bad sender")]
    assert client.post(f"/deliveries/{claimed['id']}/retry", headers=ADMIN).status_code == 202
    assert client.post(f"/deliveries/{claimed['id']}/retry", headers=ADMIN).status_code == 409
    assert client.post("/deliveries/999999/retry", headers=ADMIN).status_code == 404
    assert (
        client.get("/deliveries?status=pending", headers=ADMIN).json["deliveries"][0]["id"]
        == claimed["id"]
    )


def test_bad_query_values_are_422(client):
    assert client.get("/deliveries?status=lost", headers=ADMIN).status_code == 422
    assert client.get("/mailbox?limit=0").status_code == 422


def test_ready_needs_the_consumer_and_sender_heartbeats(client, store):
    assert client.get("/ready").status_code == 503
    store.beat("notifier-consumer", {"health": "ok"})
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json["checks"]["sender"] == "failing: the e-mail sender is not running"
    store.beat("notifier-sender", {"health": "ok"})
    assert client.get("/ready").status_code == 200


def test_ready_reports_a_consumer_that_stopped_making_progress(client, store):
    store.beat("notifier-sender", {"health": "ok"})
    store.beat("notifier-consumer", {"health": "stalled: messages wait and nothing was settled"})
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json["checks"]["consumer"].startswith("failing: stalled")


def test_ready_with_replicas_needs_every_beating_one_healthy(client, store):
    store.beat("notifier-sender@h:1", {"health": "ok"})
    store.beat("notifier-sender@h:2", {"health": "ok"})
    store.beat("notifier-consumer@h:3", {"health": "ok"})
    store.beat("notifier-consumer@h:4", {"health": "paused: the store does not answer"})
    response = client.get("/ready")
    assert response.json["checks"]["sender"] == "ok"
    assert response.json["checks"]["consumer"] == (
        "failing: paused: the store does not answer (h:4)"
    )
    with store.transaction() as cur:  # h:4 stopped beating a minute ago
        cur.execute(
            "UPDATE heartbeats SET seen_at = now() - interval '1 minute' "
            "WHERE name = 'notifier-consumer@h:4'"
        )
    assert client.get("/ready").status_code == 200


def test_metrics_have_a_series_per_consumer_replica(client, store):
    for replica, applied in (("h:1", 2), ("h:2", 9)):
        stats = ConsumerStats()
        stats.observe(0.001, applied)
        store.beat(f"notifier-consumer@{replica}", {**stats.snapshot(), "health": "ok"})
    text = client.get("/metrics", headers=ADMIN).data.decode()
    assert 'consumer_messages_total{outcome="applied",replica="h:1"} 2.0' in text
    assert 'consumer_messages_total{outcome="applied",replica="h:2"} 9.0' in text


def test_heartbeats_of_replicas_gone_for_an_hour_are_forgotten(store):
    store.beat("notifier-sender@h:old", {"health": "ok"})
    with store.transaction() as cur:
        cur.execute("UPDATE heartbeats SET seen_at = now() - interval '2 hours'")
    store.beat("notifier-sender@h:new", {"health": "ok"})
    with store.transaction() as cur:
        cur.execute("SELECT name FROM heartbeats")
        assert [row["name"] for row in cur.fetchall()] == ["notifier-sender@h:new"]


def test_standard_routes(client):
    assert client.get("/health").json["status"] == "ok"
    paths = client.get("/openapi.json").json["paths"]
    assert {"/users/{cpf}", "/mailbox", "/deliveries"} <= set(paths)


def test_ready_fails_when_the_database_answers_but_refuses_writes(
    notifier_db, config, administrator
):
    import psycopg
    from notifier.app import create_app

    name = psycopg.conninfo.conninfo_to_dict(notifier_db)["dbname"]
    admin_db = psycopg.conninfo.make_conninfo(administrator(notifier_db), dbname="postgres")
    with psycopg.connect(admin_db, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    answer = create_app(config).test_client().get("/ready")
    assert answer.status_code == 503
    assert answer.json["checks"]["database"] == "failing: ReadOnlySqlTransaction"
