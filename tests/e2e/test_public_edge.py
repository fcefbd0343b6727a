"""Through Traefik, with API keys and tracing on: what a client can put into an e-mail, into a
trace and into the pipeline.

- No person field puts a link or an address into an e-mail; the daily cap counts a mailbox
  however its address is spelt, and a suppressed e-mail says why; each key has a daily quota of
  activation e-mails (429 with Retry-After past it).
- An activation token reaches no span and no log line; a client's `traceparent` and `baggage` on
  a public route start nothing in the pipeline (a new trace, linking the client's), and a keyed
  client's trace is continued without its baggage.

The stack exports its spans to a fake OTLP collector (tests/support/fake_otlp.py).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fake_otlp import FakeCollector, ReceivedSpan
from messaging.testing import wait_until
from servicekit.auth import new_key

pytestmark = pytest.mark.e2e

WRITER, OTHER_WRITER, ADMIN = "writer", "other-writer", "admin"
SCOPES = {
    WRITER: ["person:write", "person:read"],
    OTHER_WRITER: ["person:write"],
    ADMIN: ["admin", "notifier:read"],
}
CAP, QUOTA = 2, 2  # EMAILS_PER_ADDRESS_PER_DAY, ACTIVATION_REQUESTS_PER_KEY_PER_DAY
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
KEYED_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ACTIVATE_ROUTE = "/person/<cpf>/activate"
PATIENTLY = {"timeout": 60, "interval": 0.2}  # the whole pipeline, on a shared machine


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {}


@pytest.fixture(scope="module")
def collector() -> Iterator[FakeCollector]:
    fake = FakeCollector().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def stack(start_stack, keys, collector) -> Any:
    entries: dict[str, list[str]] = {}
    for name, scopes in SCOPES.items():
        keys[name], entry = new_key(scopes)
        entries.update(entry)
    return start_stack(
        API_KEYS=json.dumps(entries),
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_BSP_SCHEDULE_DELAY="200",  # milliseconds: spans arrive soon after they end
        EMAILS_PER_ADDRESS_PER_DAY=str(CAP),
        ACTIVATION_REQUESTS_PER_KEY_PER_DAY=str(QUOTA),
    )


def call(stack, keys, method, host, path, key=None, body=None, headers=None):
    auth = {"Authorization": f"Bearer {keys[key]}"} if key else {}
    return stack.call(method, host, path, body, {**auth, **(headers or {})})


def register(stack, keys, cpf: str, email: str, name: str = "Ana Silva", headers=None) -> None:
    person = {"cpf": cpf, "name": name, "address": "Recife", "date_of_birth": "1990-04-12"}
    status, body, _ = call(
        stack, keys, "POST", "person", "/person", WRITER, {**person, "email": email}, headers
    )
    assert status == 201, body


def inbox(stack, keys, address: str) -> list[dict]:
    query = urllib.parse.urlencode({"to": address})
    status, body, _ = call(stack, keys, "GET", "notifier", f"/mailbox?{query}", ADMIN)
    assert status == 200, body
    return body["messages"]


def follow(stack, link: str, headers=None) -> int:
    """Follow an activation link through Traefik, as the person's browser does."""
    parts = urllib.parse.urlsplit(link)
    status, _page, _ = stack.call("GET", "person", f"{parts.path}?{parts.query}", None, headers)
    return status


def welcome_link(stack, keys, address: str) -> str:
    messages = wait_until(
        lambda: inbox(stack, keys, address), **PATIENTLY, what=f"the e-mail to {address}"
    )
    return messages[-1]["links"][0]


def user(stack, keys, cpf: str) -> dict:
    status, body, _ = call(stack, keys, "GET", "notifier", f"/users/{cpf}", ADMIN)
    return body if status == 200 else {}


def activation_span(collector: FakeCollector, cpf: str) -> ReceivedSpan | None:
    return next(
        (
            s
            for s in collector.spans()
            if s.service == "person"
            and s.attributes.get("http.route") == ACTIVATE_ROUTE
            and f"/person/{cpf}/" in str(s.attributes.get("http.target", ""))
        ),
        None,
    )


def outbox_trace_context(stack, cpf: str, event_type: str) -> str | None:
    with psycopg.connect(stack.env["PERSON_DATABASE_URL"]) as conn:
        row = conn.execute(
            "SELECT trace_context FROM messaging_outbox WHERE entity = 'person' "
            "AND entity_id = %s AND event_type = %s ORDER BY id DESC LIMIT 1",
            (cpf, event_type),
        ).fetchone()
    assert row is not None, (cpf, event_type)
    return row[0]


# -- the e-mail channel --------------------------------------------------------------------------
def test_a_name_with_a_link_reaches_the_inbox_without_it(stack, keys):
    register(stack, keys, "61000000001", "ana.link@example.com", "Ana https://evil.example/login")
    [mail] = wait_until(
        lambda: inbox(stack, keys, "ana.link@example.com"), **PATIENTLY, what="the welcome"
    )
    assert mail["text"].splitlines()[0] == "Welcome!"
    assert "evil" not in mail["text"]
    assert len(mail["links"]) == 1 and "/person/61000000001/activate?token=" in mail["links"][0]
    html_path = urllib.parse.urlsplit(mail["html_url"]).path
    status, html, _ = call(stack, keys, "GET", "notifier", html_path, ADMIN)
    assert status == 200 and "evil" not in html


def test_the_daily_cap_counts_sub_addresses_as_one_mailbox_and_says_why(stack, keys):
    spellings = ["victim+1@gmail.com", "Victim+2@GMAIL.com", "v.i.c.t.i.m+3@googlemail.com"]
    for n, address in enumerate(spellings):
        register(stack, keys, f"6200000000{n}", address)
    suppressed = "62000000002"
    view = wait_until(
        lambda: (
            (user(stack, keys, suppressed).get("welcome_email") or {}).get("status") == "suppressed"
            and user(stack, keys, suppressed)
        ),
        **PATIENTLY,
        what="the third welcome suppressed",
    )
    reason = view["welcome_email"]["last_error"]
    assert f"{CAP} e-mails to the mailbox victim@gmail.com in 24 h" in reason, reason
    status, listed, _ = call(
        stack, keys, "GET", "notifier", f"/deliveries?status=suppressed&cpf={suppressed}", ADMIN
    )
    assert status == 200 and [d["last_error"] for d in listed["deliveries"]] == [reason]
    for n in range(2):  # the first two went out
        status = user(stack, keys, f"6200000000{n}")["welcome_email"]["status"]
        assert status in ("pending", "sending", "sent")


def test_each_key_has_a_daily_quota_of_activation_emails(stack, keys):
    for n in range(QUOTA + 1):
        register(stack, keys, f"6300000000{n}", f"quota{n}@example.com")
    for n in range(QUOTA):
        status, _, _ = call(
            stack, keys, "POST", "person", f"/person/6300000000{n}/activation", WRITER
        )
        assert status == 202
    last = f"/person/6300000000{QUOTA}/activation"

    status, body, headers = call(stack, keys, "POST", "person", last, WRITER)

    assert status == 429, body
    assert set(body) == {"message", "errors"}
    assert "ACTIVATION_REQUESTS_PER_KEY_PER_DAY" in body["message"]
    assert 0 < int(headers["Retry-After"]) <= 86_400
    assert call(stack, keys, "POST", "person", last, OTHER_WRITER)[0] == 202  # its own quota


# -- traces and tokens ---------------------------------------------------------------------------
def test_an_activation_token_reaches_no_span_and_no_log_line(stack, keys, collector):
    cpf = "64000000001"
    register(stack, keys, cpf, "token@example.com")
    link = welcome_link(stack, keys, "token@example.com")
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["token"][0]

    assert follow(stack, link) == 200

    span = wait_until(
        lambda: activation_span(collector, cpf), **PATIENTLY, what="the activation's span"
    )
    assert span.attributes["http.target"] == f"/person/{cpf}/activate"
    wait_until(
        lambda: user(stack, keys, cpf).get("status") == "active",
        **PATIENTLY,
        what="the view active",
    )
    spans = collector.spans()
    assert not [s for s in spans if token in repr(s)]
    logs = [p for p in stack.run_dir.rglob("*") if p.is_file()]
    assert logs and not [p for p in logs if token in p.read_text(errors="replace")]


def test_a_clients_trace_on_a_public_route_starts_nothing_in_the_pipeline(stack, keys, collector):
    cpf = "64000000002"
    register(stack, keys, cpf, "edge@example.com")
    link = welcome_link(stack, keys, "edge@example.com")
    client_context = {
        "traceparent": f"00-{CLIENT_TRACE}-b7ad6b7169203331-01",
        "tracestate": "vendor=chosen-by-the-client",
        "baggage": "tenant=evil,role=admin",
    }

    assert follow(stack, link, client_context) == 200

    span = wait_until(
        lambda: activation_span(collector, cpf), **PATIENTLY, what="the activation's span"
    )
    assert span.trace_id != CLIENT_TRACE and span.parent_id == ""  # a trace of our own
    assert span.links == [CLIENT_TRACE]  # that says which trace the client came with
    stored = outbox_trace_context(stack, cpf, "person.updated")
    assert stored and span.trace_id in stored
    for what in (CLIENT_TRACE, "baggage", "evil", "chosen-by-the-client"):
        assert what not in stored, stored
    # the pipeline continued the activation's own trace, and none of the client's
    wait_until(
        lambda: (
            {"person-relay", "notifier-consumer"}
            <= {s.service for s in collector.spans() if s.trace_id == span.trace_id}
        ),
        **PATIENTLY,
        what="the relay and the notifier in the activation's trace",
    )
    assert not [s for s in collector.spans() if s.trace_id == CLIENT_TRACE]


def test_a_keyed_clients_trace_is_continued_without_its_baggage(stack, keys, collector):
    cpf = "64000000003"
    headers = {
        "traceparent": f"00-{KEYED_TRACE}-00f067aa0ba902b7-01",
        "baggage": "tenant=smuggled",
    }
    register(stack, keys, cpf, "keyed@example.com", headers=headers)
    stored = outbox_trace_context(stack, cpf, "person.created")
    assert stored and KEYED_TRACE in stored
    assert "baggage" not in stored and "smuggled" not in stored
    wait_until(
        lambda: (
            {"person", "person-relay", "score-consumer", "notifier-consumer"}
            <= {s.service for s in collector.spans() if s.trace_id == KEYED_TRACE}
        ),
        **PATIENTLY,
        what="the registration's trace through the pipeline",
    )
