"""The stack as it is exposed: production mode, API keys with scopes, limits, through Traefik.

A stack of this module's own runs with APP_ENV=production, an API_KEYS of four keys, a strong
activation secret, a public person URL and SendGrid (the fake, on a free port). Every business
route is tried without a key (401), with a key lacking its scope (403) and with the right one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from messaging.testing import wait_until
from servicekit.auth import new_key
from stack.fake_sendgrid import FakeSendGrid

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SECRET = "a-production-activation-secret-of-48-characters!!"
WRITE, READ, OTHER, ADMIN = "write", "read", "other", "admin"
SCOPES = {
    WRITE: ["person:write", "person:read"],
    READ: ["person:read", "score:read", "notifier:read", "metrics"],
    OTHER: ["score:read"],
    ADMIN: ["admin"],
}


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {}


@pytest.fixture(scope="module")
def sendgrid() -> Iterator[FakeSendGrid]:
    fake = FakeSendGrid().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def prod(start_stack, stack_env, keys, sendgrid) -> Any:
    entries: dict[str, list[str]] = {}
    for name, scopes in SCOPES.items():
        keys[name], entry = new_key(scopes)
        entries.update(entry)
    return start_stack(
        APP_ENV="production",
        API_KEYS=json.dumps(entries),
        ACTIVATION_SECRET=SECRET,
        PUBLIC_PERSON_URL=f"http://person.localhost:{stack_env['GATEWAY_PORT']}",
        SENDGRID_API_KEY="SG.production-test-key",
        SENDGRID_HOST=sendgrid.url,
        RATE_LIMIT_AVERAGE="50",
        RATE_LIMIT_BURST="100",
        ACTIVATION_RESEND_SECONDS="60",
        CONSOLE_SECRET="a-production-console-secret-of-40-characters",
    )


def call(stack: Any, method: str, host: str, path: str, key: str | None, body=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return stack.call(method, host, path, body, headers)


PERSON = {"name": "Prod", "address": "Recife", "date_of_birth": "1990-04-12"}
# Every business route with the scope it needs (docs/security.md); {cpf} and {item} are filled in.
ROUTES = [
    ("POST", "person", "/person", "person:write", {"cpf": "{new}", **PERSON}),
    ("GET", "person", "/person/{cpf}", "person:read", None),
    ("PATCH", "person", "/person/{cpf}", "person:write", {"name": "Renamed"}),
    ("POST", "person", "/person/{cpf}/income", "person:write", {"type": "t", "value": 5}),
    ("DELETE", "person", "/person/{cpf}/income/{item}", "person:write", None),
    ("POST", "person", "/person/{cpf}/activation", "person:write", None),
    ("POST", "person", "/person/bulk", "person:write", [{"cpf": "{new}", **PERSON}]),
    ("GET", "person", "/imports/00000000-0000-0000-0000-000000000000", "person:read", None),
    ("DELETE", "person", "/person/{new}", "person:write", None),
    ("GET", "score", "/{cpf}/score", "score:read", None),
    ("GET", "notifier", "/users/{cpf}", "notifier:read", None),
    ("GET", "notifier", "/deliveries", "admin", None),
    ("POST", "notifier", "/deliveries/1/retry", "admin", None),
    ("GET", "person", "/metrics", "metrics", None),
    ("GET", "score", "/metrics", "metrics", None),
    ("GET", "notifier", "/metrics", "metrics", None),
]


def holder(scope: str) -> str:
    return next(name for name, scopes in SCOPES.items() if scope in scopes)


def lacker(scope: str) -> str:
    return next(name for name, scopes in SCOPES.items() if scope not in scopes)


@pytest.fixture(scope="module")
def someone(prod, keys) -> dict[str, str]:
    cpf = "50000000001"
    status, _, _ = call(prod, "POST", "person", "/person", keys[WRITE], {"cpf": cpf, **PERSON})
    assert status == 201
    status, item, _ = call(
        prod, "POST", "person", f"/person/{cpf}/income", keys[WRITE], {"type": "t", "value": 1}
    )
    assert status == 201
    return {"cpf": cpf, "item": item["id"]}


def fill(text, someone: dict[str, str], new: str):
    if isinstance(text, str):
        return text.format(cpf=someone["cpf"], item=someone["item"], new=new)
    if isinstance(text, list):
        return [fill(t, someone, new) for t in text]
    if isinstance(text, dict):
        return {k: fill(v, someone, new) for k, v in text.items()}
    return text


@pytest.mark.parametrize(("method", "host", "path", "scope", "body"), ROUTES)
def test_every_business_route_needs_a_key_with_its_scope(
    prod, keys, someone, method, host, path, scope, body
):
    new = f"5{abs(hash((method, path))) % 10**10:010d}"
    path, body = fill(path, someone, new), fill(body, someone, new)

    status, answer, headers = call(prod, method, host, path, None, body)
    assert status == 401, answer
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, _ = call(prod, method, host, path, "mk_not-a-key-anyone-was-given", body)
    assert status == 401
    status, answer, headers = call(prod, method, host, path, keys[lacker(scope)], body)
    assert status == 403, answer
    assert f'scope="{scope}"' in headers["WWW-Authenticate"]

    status, answer, _ = call(prod, method, host, path, keys[holder(scope)], body)
    assert status not in (401, 403), answer
    assert status < 500, answer


@pytest.mark.parametrize("host", ["person", "score", "notifier"])
def test_health_ready_and_the_documents_are_open(prod, host):
    for path in ("/health", "/openapi.json", "/"):
        assert call(prod, "GET", host, path, None)[0] == 200
    if host == "person":
        assert call(prod, "GET", host, "/asyncapi.json", None)[1]["asyncapi"] == "3.0.0"
    assert call(prod, "GET", host, "/ready", None)[0] in (200, 503)
    document = call(prod, "GET", host, "/openapi.json", None)[1]
    operations = [op for item in document["paths"].values() for op in item.values()]
    assert all("security" in op for op in operations)


def test_the_mailbox_is_closed_in_production(prod, keys):
    assert call(prod, "GET", "notifier", "/mailbox", keys[ADMIN])[0] == 404
    assert call(prod, "GET", "notifier", "/mailbox/1", keys[ADMIN])[0] == 404


def test_registration_and_activation_with_keys_and_no_token_in_any_log(prod, keys, sendgrid):
    cpf = "50000000002"
    body = {"cpf": cpf, **PERSON, "email": "prod@example.com"}
    assert call(prod, "POST", "person", "/person", keys[WRITE], body)[0] == 201

    def link() -> str | None:
        for message in list(sendgrid.accepted):
            if message["personalizations"][0]["to"][0]["email"] == "prod@example.com":
                text = next(c["value"] for c in message["content"] if c["type"] == "text/plain")
                return re.search(r"http\S+", text).group(0)
        return None

    url = urllib.parse.urlsplit(wait_until(link, timeout=30, what="the welcome via SendGrid"))
    token = urllib.parse.parse_qs(url.query)["token"][0]
    status, page, _ = call(prod, "GET", "person", f"{url.path}?{url.query}", None)  # no key
    assert status == 200 and "Account activated" in page

    # The resend limit: the registration was just now.
    status, _, headers = call(prod, "POST", "person", f"/person/{cpf}/activation", keys[WRITE])
    assert status == 409  # already active
    other = {"cpf": "50000000003", **PERSON, "email": "other@example.com"}
    assert call(prod, "POST", "person", "/person", keys[WRITE], other)[0] == 201
    status, _, headers = call(prod, "POST", "person", "/person/50000000003/activation", keys[WRITE])
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60

    logs = list(prod.run_dir.rglob("*.log"))
    assert logs
    for log in logs:
        text = log.read_text(errors="replace")
        assert token not in text, f"the activation token is in {log.name}"
        for key in keys.values():
            assert key not in text, f"an API key is in {log.name}"


def test_an_import_belongs_to_the_key_that_made_it(prod, keys):
    people = [{"cpf": "50000000010", **PERSON}]
    headers = {"Authorization": f"Bearer {keys[WRITE]}", "Idempotency-Key": "mine"}
    status, made, _ = prod.call("POST", "person", "/person/bulk", people, headers)
    assert status == 202
    assert call(prod, "GET", "person", f"/imports/{made['id']}", keys[WRITE])[0] == 200
    assert call(prod, "GET", "person", f"/imports/{made['id']}", keys[READ])[0] == 404
    status, again, _ = prod.call("POST", "person", "/person/bulk", people, headers)
    assert (status, again["id"]) == (202, made["id"])


def is_gateways(answer: tuple[int, Any, Any]) -> bool:
    """A 429 of Traefik's rate limit (its message names the gateway's limit)."""
    status, body, _ = answer
    return status == 429 and isinstance(body, dict) and "from this address" in body["message"]


def assert_contract_shape(answer: tuple[int, Any, Any]) -> None:
    status, body, headers = answer
    assert headers["Content-Type"] == "application/json", (status, body)
    assert isinstance(body, dict) and set(body) == {"message", "errors"}, (status, body)
    assert isinstance(body["message"], str) and body["errors"] == {}, body


def test_traefik_answers_429_past_the_rate_limit_in_the_contracts_shape(prod):
    def hit(_n: int) -> tuple[int, Any, Any]:
        return call(prod, "GET", "score", "/health", None)

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(hit, range(400)))
    statuses = [status for status, _, _ in answers]
    assert 429 in statuses and 200 in statuses
    for answer in answers:
        if answer[0] == 429:
            assert_contract_shape(answer)
            assert is_gateways(answer), answer[1]
            assert "over 50 a second, bursts of 100" in answer[1]["message"]
            assert 1 <= int(answer[2]["Retry-After"]) <= 2  # Traefik's own, kept


def test_a_services_own_429_keeps_its_message_and_retry_after_past_the_gateway(prod, keys):
    """Under a burst, the person service refuses the activation e-mails itself (asked again too
    soon) and the gateway refuses the rest: each says its own reason and its own wait."""
    cpf = "50000000020"
    person = {"cpf": cpf, **PERSON, "email": "burst@example.com"}
    assert call(prod, "POST", "person", "/person", keys[WRITE], person)[0] == 201

    def ask(_n: int) -> tuple[int, Any, Any]:
        return call(prod, "POST", "person", f"/person/{cpf}/activation", keys[WRITE])

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(ask, range(300)))
    assert {status for status, _, _ in answers} == {429}
    gateways = [answer for answer in answers if is_gateways(answer)]
    services = [answer for answer in answers if not is_gateways(answer)]
    assert gateways and services
    for answer in answers:
        assert_contract_shape(answer)
    for _, body, headers in services:
        assert re.fullmatch(
            r"an activation e-mail was sent \d+s ago: ask again in \d+s", body["message"]
        ), body
        assert 2 < int(headers["Retry-After"]) <= 60  # the service's wait, not the gateway's


REFUSALS = [
    ("person", {"API_KEYS": None}, "API_KEYS"),
    ("person", {"ACTIVATION_SECRET": None}, "ACTIVATION_SECRET"),
    ("person", {"ACTIVATION_SECRET": "short-secret"}, "ACTIVATION_SECRET"),
    ("person", {"API_KEYS": '{"nothex": ["admin"]}'}, "API_KEYS"),
    ("score", {"API_KEYS": None}, "API_KEYS"),
    ("notifier", {"SENDGRID_API_KEY": None}, "SENDGRID_API_KEY"),
    ("notifier", {"PUBLIC_PERSON_URL": None}, "PUBLIC_PERSON_URL"),
    ("notifier", {"APP_ENV": "staging"}, "app_env"),
    ("console", {"CONSOLE_SECRET": "too-short"}, "CONSOLE_SECRET"),
]


@pytest.mark.parametrize(("service", "change", "named"), REFUSALS)
def test_production_refuses_to_start_without_what_it_needs(prod, service, change, named):
    env = {k: v for k, v in prod.env.items() if k not in change}
    env.update({k: v for k, v in change.items() if v is not None})
    started = subprocess.run(
        [sys.executable, "-c", f"from {service}.app import create_app; create_app()"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode != 0
    assert named in started.stderr
    assert SECRET not in started.stderr and "short-secret" not in started.stderr


def test_gunicorn_itself_refuses_and_says_why(prod):
    env = {k: v for k, v in prod.env.items() if k != "API_KEYS"}
    env["PERSON_PORT"] = "0"
    started = subprocess.run(
        [
            str(Path(sys.executable).parent / "gunicorn"),
            "-c",
            "services/person/gunicorn.conf.py",
            "person.app:create_app()",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode != 0
    assert "API_KEYS must be set when APP_ENV=production" in started.stderr
