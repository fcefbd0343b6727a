"""The operators' console in a real browser (Debian's Chromium, driven by Playwright), on a stack
of this module's own with API keys on: sign in, each page, a registration's journey, a group of
dead letters replayed, the score model rebuilt; and the APIs' own documentation (Swagger UI at
each service's root). Screenshots go to test-artifacts/console/."""

from __future__ import annotations

import json
import re
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from messaging.testing import wait_until
from messaging.topology import Topology
from servicekit.auth import new_key

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-artifacts" / "console"
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {}


@pytest.fixture(scope="module")
def console_stack(start_stack, keys):
    entries: dict[str, list[str]] = {}
    keys["admin"], entry = new_key(["admin"])
    entries.update(entry)
    keys["reader"], entry = new_key(["person:read"])
    entries.update(entry)
    keys["console"], entry = new_key(
        ["person:read", "person:write", "score:read", "notifier:read", "metrics", "admin"]
    )
    entries.update(entry)
    return start_stack(API_KEYS=json.dumps(entries), CONSOLE_API_KEY=keys["console"])


@pytest.fixture(scope="module")
def page(console_stack) -> Iterator:
    if not CHROMIUM.exists():
        pytest.fail("the browser tests need Debian's chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        # The console is console.localhost on the stack's gateway; Chromium resolves
        # *.localhost to this machine by itself.
        context = browser.new_context(base_url=f"http://console.localhost:{console_stack.port}")
        yield context.new_page()
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def register(stack, key: str, cpf: str, email: str) -> str:
    request_id = f"console-{uuid.uuid4().hex[:8]}"
    body = {
        "cpf": cpf,
        "name": "Ana Console",
        "address": "Recife",
        "date_of_birth": "1990-04-12",
        "email": email,
    }
    headers = {"Authorization": f"Bearer {key}", "X-Request-Id": request_id}
    assert stack.call("POST", "person", "/person", body, headers)[0] == 201
    item = {"type": "salary", "value": 1000}
    assert stack.call("POST", "person", f"/person/{cpf}/income", item, headers)[0] == 201
    return request_id


def test_signing_in_needs_a_key_with_the_admin_scope(page, keys):
    page.goto("/")
    assert "/signin" in page.url
    page.fill("input[name=key]", keys["reader"])
    page.click("button:has-text('Sign in')")
    assert "not a key with the admin scope" in page.content()
    page.fill("input[name=key]", keys["admin"])
    page.click("button:has-text('Sign in')")
    page.wait_for_selector("#backlog")
    cookie = next(c for c in page.context.cookies() if c["name"] == "console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert keys["admin"] not in json.dumps(page.context.cookies())
    shot(page, "overview")


def test_a_post_without_the_forms_csrf_token_is_refused(page, console_stack):
    status = page.evaluate(
        "fetch('/rebuild', {method: 'POST', body: new URLSearchParams({csrf: 'forged'})})"
        ".then(r => r.status)"
    )
    assert status == 400


def test_the_journey_of_a_registration(page, console_stack, keys):
    cpf = "61000000001"
    request_id = register(console_stack, keys["console"], cpf, "journey@example.com")

    def both_applied() -> bool:
        page.goto(f"/journey?q={cpf}")
        return all(page.inner_text(f"#model-{m}") == "applied" for m in ("score", "notifier"))

    wait_until(both_applied, timeout=30, what="both read models applied in the journey")
    text = page.inner_text("main")
    assert "person.created" in text and "income.created" in text and request_id in text
    assert "welcome" in text
    shot(page, "journey")
    page.click(f"a:has-text('{request_id}')")  # the request that made the change
    assert "person.created" in page.inner_text("main")


def test_a_group_of_dead_letters_is_replayed_and_the_audit_log_says_so(page, console_stack, keys):
    queue = Topology("score", console_stack.env["EVENTS_EXCHANGE"]).queue
    conn = pika.BlockingConnection(pika.URLParameters(console_stack.env["AMQP_URL"]))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for n in range(3):  # three events no model can take: dead, with one reason
            channel.basic_publish(
                "",
                queue,
                json.dumps({"event_type": "person.created", "n": n}).encode(),
                pika.BasicProperties(message_id=f"bad-{n}-{uuid.uuid4().hex[:6]}"),
            )
    finally:
        conn.close()

    def listed() -> bool:
        page.goto("/failures")
        return "DecodeError" in page.inner_text("main")

    wait_until(listed, timeout=30, what="the dead letters listed")
    shot(page, "failures")
    page.click("a.open")
    assert "Personal data masked" in page.inner_text("main")
    count = int(re.search(r"(\d+) message\(s\)", page.inner_text("main")).group(1))
    assert count >= 3
    page.click("#replay-group")
    assert f"replay: {count} of {count}" in page.inner_text("main")
    page.goto("/audit")
    row = page.inner_text("table")
    assert "replay" in row and queue in row
    shot(page, "audit")


def test_the_score_model_is_rebuilt_from_the_console(page, console_stack, keys):
    register(console_stack, keys["console"], "61000000002", "rebuild@example.com")
    page.goto("/rebuild")
    page.click("#rebuild")

    def rebuilt() -> bool:
        page.goto("/rebuild")
        return page.inner_text("#rebuild-state") == "ready" and "keys wiped" in page.content()

    wait_until(rebuilt, timeout=60, what="the score model ready again")
    shot(page, "rebuild")
    status, score, _ = console_stack.call(
        "GET", "score", "/61000000002/score", headers={"Authorization": f"Bearer {keys['console']}"}
    )
    assert status == 200 and score["score"] == 20
    page.goto("/audit")
    assert "rebuild" in page.inner_text("table")


def test_the_overview_shows_every_queue_and_process(page, console_stack):
    page.goto("/")
    page.wait_for_selector("#backlog")
    text = page.inner_text("main")
    for service in ("person", "score", "notifier"):
        assert service in text
    assert Topology("score", console_stack.env["EVENTS_EXCHANGE"]).dead_queue in text
    # Each model's last verification and what it repaired (the overview refreshes itself).
    wait_until(
        lambda: (
            len(
                re.findall(
                    r"verified \d+ s ago: \d+ bucket\(s\) differed; \d+ repair",
                    page.inner_text("main"),
                )
            )
            == 2
        ),
        what="both models' last verification on the overview",
    )


def test_each_apis_root_page_renders_every_operation_of_its_document_from_its_own_host(
    page, console_stack
):
    """Swagger UI at person.localhost/ (open without a key), its assets served by the person
    service itself: every operation of /openapi.json is shown, and no request leaves for
    another host (no CDN, no validator.swagger.io)."""
    origin = f"person.localhost:{console_stack.port}"
    docs = page.context.new_page()
    requested: list[str] = []
    docs.on("request", lambda request: requested.append(request.url))
    docs.goto(f"http://{origin}/")
    docs.wait_for_selector(".opblock-post [data-path='/person']")
    status, document, _ = console_stack.call("GET", "person", "/openapi.json")
    assert status == 200
    documented = {(m.upper(), path) for path, item in document["paths"].items() for m in item}
    shown = docs.eval_on_selector_all(
        ".opblock",
        "blocks => blocks.map(b => [b.querySelector('.opblock-summary-method').textContent,"
        " b.querySelector('.opblock-summary-path').dataset.path])",
    )
    assert {(method, path) for method, path in shown} == documented
    assert docs.locator(".btn.authorize").is_visible()  # the bearer scheme: try it with a key
    shot(docs, "person-api")
    elsewhere = [
        url
        for url in requested
        if urllib.parse.urlsplit(url).scheme in ("http", "https")
        and urllib.parse.urlsplit(url).netloc != origin
    ]
    assert requested and not elsewhere, elsewhere
    docs.close()


def test_the_pages_run_under_their_content_security_policy(page, console_stack):
    """Every answer forbids framing, inline script and keeping a copy, and the pages still work:
    the overview and the rebuild page refresh from the console's own script file."""
    refused: list[str] = []

    def said(message) -> None:
        refused.append(message.text)

    page.on("console", said)
    answer = page.goto("/")
    headers = answer.all_headers()
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"
    assert headers["referrer-policy"] == "no-referrer"
    page.wait_for_selector("#backlog")  # fetched by /static/console.js, under the policy
    page.goto("/rebuild")
    page.wait_for_selector("#rebuild-state")
    page.goto("/journey")
    page.goto("/audit")
    page.remove_listener("console", said)
    assert not [text for text in refused if "Content Security Policy" in text], refused
    log = page.inner_text("table")
    assert "view journey" in log  # the journeys followed above
    assert "sign in failed" in log  # the reader's key, refused in the first test


def test_signing_out_ends_the_session_even_for_a_copied_cookie(page, console_stack):
    page.goto("/")
    page.wait_for_selector("#backlog")
    copied = next(c for c in page.context.cookies() if c["name"] == "console")
    elsewhere = page.context.browser.new_context(
        base_url=f"http://console.localhost:{console_stack.port}"
    )
    try:
        elsewhere.add_cookies([copied])
        other = elsewhere.new_page()
        other.goto("/audit")
        assert urllib.parse.urlsplit(other.url).path == "/audit"  # the copy works, for now
        page.click("button:has-text('sign out')")
        page.wait_for_url("**/signin")
        other.goto("/audit")
        assert urllib.parse.urlsplit(other.url).path == "/signin"  # and no longer
        assert "Sign in" in other.inner_text("main")
    finally:
        elsewhere.close()


def test_a_sign_in_link_to_another_site_lands_on_the_console(page, console_stack, keys):
    """GET /signin?next=/%09/evil.example/: browsers drop the tab, so "/\\t/evil.example/" would
    send a freshly signed-in operator to //evil.example/."""
    asked: list[str] = []

    def requested(request) -> None:
        asked.append(request.url)

    page.on("request", requested)
    page.goto("/signin?next=/%09/evil.example/")
    page.fill("input[name=key]", keys["admin"])
    page.click("button:has-text('Sign in')")
    page.wait_for_selector("#backlog")
    page.remove_listener("request", requested)
    landed = urllib.parse.urlsplit(page.url)
    assert landed.hostname == "console.localhost" and landed.path == "/"
    assert not [url for url in asked if "evil.example" in urllib.parse.urlsplit(url).netloc]


def test_failed_sign_ins_from_one_address_are_throttled_whatever_it_claims(
    page, console_stack, keys
):
    """Through Traefik, which puts the client's address last in X-Forwarded-For: a different
    claimed address on each try changes nothing. Last in the module: it locks this address out."""
    attempts = 0
    while True:
        attempts += 1
        page.context.set_extra_http_headers({"X-Forwarded-For": f"10.0.0.{attempts}"})
        page.goto("/signin")
        page.fill("input[name=key]", "mk_not-a-key")
        with page.expect_response(lambda r: r.request.method == "POST") as posted:
            page.click("button:has-text('Sign in')")
        if posted.value.status == 429:
            break
        assert posted.value.status == 401 and attempts <= 5  # CONSOLE_SIGNIN_FAILURES
    assert 0 < int(posted.value.headers["retry-after"]) <= 900
    assert "too many failed sign-ins" in page.inner_text("main")
    page.context.set_extra_http_headers({})
    page.goto("/signin")
    page.fill("input[name=key]", keys["admin"])  # the right key waits too: no oracle
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.click("button:has-text('Sign in')")
    assert posted.value.status == 429
