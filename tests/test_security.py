"""Security guarantees, in process over the real stores.

Activation links that were forged, tampered with, expired, meant for someone else or for an old
address activate nobody; the notifier's admin routes need a key with the admin scope; hostile
text is data, never SQL or markup; a body over the limit is refused; secrets stay out of the
logs. (The image's non-root USER is checked in test_stack_files.py.)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from messaging.testing import running, wait_until
from notifier.app import create_app as notifier_app
from notifier.config import NotifierConfig
from notifier.consumer import UserView
from notifier.email import TOKEN_SALT, Composer, composer_for
from notifier.sender import Sender, transport_for
from notifier.store import NotifierStore
from person.app import create_app as person_app
from person.config import PersonConfig
from person.store import PgStore
from psycopg_pool import ConnectionPool
from servicekit.auth import digest
from servicekit.runner import configure_logging
from stack.fake_sendgrid import FakeSendGrid

pytestmark = pytest.mark.integration

SECRET = "security-activation-secret"
TTL = 3600
ADMIN_KEY = "mk_security-admin-key-for-the-tests"
READER_KEY = "mk_security-reader-key-for-the-tests"
API_KEYS = json.dumps({digest(ADMIN_KEY): ["admin"], digest(READER_KEY): ["notifier:read"]})
SENDGRID_KEY = "SG.security-test-key.do-not-log"
MAX_BODY = 4096
PERSON_URL = "http://person.test"
SCRIPT = "<script>alert(1)</script>"
ESCAPED_SCRIPT = "&lt;script&gt;alert(1)&lt;/script&gt;"
ANA, BEA = "11111111111", "22222222222"


# -- person service ----------------------------------------------------------------------------
@pytest.fixture
def person(person_db, servers) -> Iterator[FlaskClient]:
    """The person API over its own PostgreSQL database."""
    config = PersonConfig(
        person_database_url=person_db,
        amqp_url=servers.amqp,
        activation_secret=SECRET,
        activation_ttl_seconds=TTL,
        max_body_bytes=MAX_BODY,
    )
    with ConnectionPool(person_db, min_size=1, max_size=4) as pool:
        yield person_app(config, store=PgStore(pool)).test_client()


def register(client: FlaskClient, cpf: str, email: str | None, name: str = "Ana") -> None:
    response = client.post(
        "/person",
        json={
            "cpf": cpf,
            "name": name,
            "address": "Recife",
            "date_of_birth": "1990-04-12",
            "email": email,
        },
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    REGISTERED[cpf] = response.get_json()["created_at"]


# When each CPF of the running test registered: activation links are bound to the registration.
REGISTERED: dict[str, str] = {}


def status_of(client: FlaskClient, cpf: str) -> str:
    return client.get(f"/person/{cpf}").get_json()["status"]


def follow(client: FlaskClient, cpf: str, token: str):
    return client.get(f"/person/{cpf}/activate", query_string={"token": token})


def genuine(cpf: str, email: str) -> str:
    """A token as the notifier signs it into the welcome e-mail's link."""
    link = Composer(SECRET, PERSON_URL, TTL).link(cpf, email, REGISTERED.get(cpf, "2026-01-01"))
    return link.split("?token=", 1)[1]


class _TwoTtlsAgo(TimestampSigner):
    def get_timestamp(self) -> int:
        return int(time.time()) - 2 * TTL


def expired(cpf: str, email: str) -> str:
    signer = URLSafeTimedSerializer(SECRET, salt=TOKEN_SALT, signer=_TwoTtlsAgo)
    return signer.dumps({"cpf": cpf, "email": email, "registered_at": REGISTERED[cpf]})


def signed_with_another_secret(cpf: str, email: str) -> str:
    return URLSafeTimedSerializer("not-the-secret", salt=TOKEN_SALT).dumps(
        {"cpf": cpf, "email": email}
    )


def with_a_tampered_signature(cpf: str, email: str) -> str:
    payload, timestamp, signature = genuine(cpf, email).rsplit(".", 2)
    # A character in the middle: the last one of a base64 string may only carry padding bits.
    middle = len(signature) // 2
    changed = "B" if signature[middle] != "B" else "C"
    return f"{payload}.{timestamp}.{signature[:middle]}{changed}{signature[middle + 1 :]}"


def with_a_tampered_payload(cpf: str, email: str) -> str:
    """The right payload under the signature of a genuine link sent to another address."""
    payload = genuine(cpf, email).split(".", 1)[0]
    _, timestamp, signature = genuine(cpf, "mallory@example.com").rsplit(".", 2)
    return f"{payload}.{timestamp}.{signature}"


def for_another_person(_cpf: str, email: str) -> str:
    return genuine(BEA, email)


@pytest.mark.parametrize(
    ("make_token", "status", "title"),
    [
        (signed_with_another_secret, 400, "Activation link not valid"),
        (with_a_tampered_signature, 400, "Activation link not valid"),
        (with_a_tampered_payload, 400, "Activation link not valid"),
        (for_another_person, 400, "Activation link not valid"),
        (expired, 410, "Activation link expired"),
    ],
)
def test_a_bad_activation_token_activates_nobody(
    person, person_db, make_token: Callable[[str, str], str], status: int, title: str
):
    register(person, ANA, "ana@example.com")
    register(person, BEA, "ana@example.com")  # same address: only the CPF tells them apart
    response = follow(person, ANA, make_token(ANA, "ana@example.com"))
    assert response.status_code == status
    assert response.mimetype == "text/html"
    assert f"<h1>{title}</h1>" in response.get_data(as_text=True)
    assert (status_of(person, ANA), status_of(person, BEA)) == ("pending", "pending")
    assert updated_events(person_db) == 0


def test_a_token_for_the_old_address_is_refused_once_the_email_changed(person):
    register(person, ANA, "old@example.com")
    old_token = genuine(ANA, "old@example.com")
    changed = person.patch(f"/person/{ANA}", json={"email": "new@example.com"})
    assert changed.status_code == 200
    response = follow(person, ANA, old_token)
    assert response.status_code == 400
    assert status_of(person, ANA) == "pending"
    assert follow(person, ANA, genuine(ANA, "new@example.com")).status_code == 200
    assert status_of(person, ANA) == "active"


def test_a_genuine_token_activates_and_the_page_escapes_the_name(person, person_db):
    register(person, ANA, "ana@example.com", name=SCRIPT)
    response = follow(person, ANA, genuine(ANA, "ana@example.com"))
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert ESCAPED_SCRIPT in page and SCRIPT not in page
    assert status_of(person, ANA) == "active"
    assert updated_events(person_db) == 1


def updated_events(person_db: str) -> int:
    with psycopg.connect(person_db) as conn:
        return conn.execute(
            "SELECT count(*) FROM messaging_outbox WHERE event_type = 'person.updated'"
        ).fetchone()[0]


# -- hostile text --------------------------------------------------------------------------------
HOSTILE = [
    "'; DROP TABLE people; --",
    "'; DROP TABLE person; --",
    "Robert'); DELETE FROM messaging_outbox;--",
    "x' OR '1'='1",
    SCRIPT,
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_is_stored_and_returned_verbatim(person, person_db, text: str):
    register(person, BEA, None, name="Bea")  # a bystander, whose rows must survive
    register(person, ANA, None, name=text)
    assert person.patch(f"/person/{ANA}", json={"address": text}).status_code == 200
    item = person.post(f"/person/{ANA}/income", json={"type": text, "value": "10.00"})
    assert item.status_code == 201

    shown = person.get(f"/person/{ANA}").get_json()
    assert (shown["name"], shown["address"], shown["incomes"][0]["type"]) == (text, text, text)
    assert person.get(f"/person/{ANA}' OR '1'='1").status_code == 404
    with psycopg.connect(person_db) as conn:
        people = conn.execute("SELECT cpf, name, address FROM person ORDER BY cpf").fetchall()
        events = conn.execute(
            "SELECT event_type, entity_id FROM messaging_outbox ORDER BY id"
        ).fetchall()
    assert people == [(ANA, text, text), (BEA, "Bea", "Recife")]
    assert [event for event, _ in events] == [
        "person.created",
        "person.created",
        "person.updated",
        "income.created",
    ]
    assert events[0][1] == BEA


# -- body limit ----------------------------------------------------------------------------------
def padded(body: dict[str, Any], size: int) -> bytes:
    """The JSON body, padded with insignificant whitespace to exactly `size` bytes."""
    raw = json.dumps(body).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def test_a_body_over_max_body_bytes_is_refused_with_413(person):
    body = {"cpf": ANA, "name": "Ana", "address": "Recife", "date_of_birth": "1990-04-12"}
    too_large = person.post(
        "/person", data=padded(body, MAX_BODY + 1), content_type="application/json"
    )
    assert too_large.status_code == 413
    assert too_large.get_json() == {"message": "the body is too large", "errors": {}}
    assert person.get(f"/person/{ANA}").status_code == 404

    at_the_limit = person.post(
        "/person", data=padded(body, MAX_BODY), content_type="application/json"
    )
    assert at_the_limit.status_code == 201
    patch = person.patch(
        f"/person/{ANA}",
        data=padded({"name": "Bia"}, MAX_BODY + 1),
        content_type="application/json",
    )
    assert patch.status_code == 413
    assert person.get(f"/person/{ANA}").get_json()["name"] == "Ana"


# -- notifier ------------------------------------------------------------------------------------
@pytest.fixture
def notifier_config(notifier_db, servers, fake_sendgrid) -> NotifierConfig:
    return NotifierConfig(
        notifier_database_url=notifier_db,
        amqp_url=servers.amqp,
        sendgrid_api_key=SENDGRID_KEY,
        sendgrid_host=fake_sendgrid.url,
        sendgrid_timeout_seconds=2,
        activation_secret=SECRET,
        public_person_url=PERSON_URL,
        api_keys=API_KEYS,
        sender_poll_seconds=0.1,
    )


@pytest.fixture
def notifier_store(notifier_db) -> Iterator[NotifierStore]:
    with ConnectionPool(notifier_db, min_size=1, max_size=4) as pool:
        yield NotifierStore(pool)


@pytest.fixture
def failed_delivery(notifier_store, notifier_config, person_event) -> int:
    UserView(notifier_store)(person_event(ANA))
    (claimed,) = notifier_store.claim_due(1, 300)
    notifier_store.mark_failed(claimed, "HTTP 400: invalid address")
    return claimed["id"]


@pytest.fixture
def notifier(notifier_config, notifier_store) -> FlaskClient:
    return notifier_app(notifier_config, notifier_store).test_client()


def delivery_status(store: NotifierStore, delivery_id: int) -> str:
    return next(d["status"] for d in store.deliveries(None, 50) if d["id"] == delivery_id)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token",
        "Bearer ",
        f"Bearer {ADMIN_KEY[:-1]}",
        f"Basic {ADMIN_KEY}",
        ADMIN_KEY,
        f"Bearer {digest(ADMIN_KEY)}",  # the digest is not the key
    ],
)
def test_admin_routes_answer_401_without_an_admin_key(
    notifier, notifier_store, failed_delivery, authorization
):
    headers = {} if authorization is None else {"Authorization": authorization}
    listing = notifier.get("/deliveries", headers=headers)
    assert listing.status_code == 401
    assert listing.headers["WWW-Authenticate"].startswith("Bearer")
    assert set(listing.get_json()) == {"message", "errors"}
    assert b"ana@example.com" not in listing.data

    retry = notifier.post(f"/deliveries/{failed_delivery}/retry", headers=headers)
    assert retry.status_code == 401
    assert delivery_status(notifier_store, failed_delivery) == "failed"


def test_admin_routes_answer_403_to_a_key_without_the_admin_scope(
    notifier, notifier_store, failed_delivery
):
    headers = {"Authorization": f"Bearer {READER_KEY}"}
    listing = notifier.get("/deliveries", headers=headers)
    assert listing.status_code == 403
    assert 'scope="admin"' in listing.headers["WWW-Authenticate"]
    assert notifier.post(f"/deliveries/{failed_delivery}/retry", headers=headers).status_code == 403
    assert delivery_status(notifier_store, failed_delivery) == "failed"


def test_admin_routes_answer_with_an_admin_key(notifier, notifier_store, failed_delivery):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    listing = notifier.get("/deliveries?status=failed", headers=headers)
    assert listing.status_code == 200
    assert [d["id"] for d in listing.get_json()["deliveries"]] == [failed_delivery]
    assert notifier.post(f"/deliveries/{failed_delivery}/retry", headers=headers).status_code == 202
    assert delivery_status(notifier_store, failed_delivery) == "pending"


def test_the_welcome_email_leaves_a_script_in_the_name_out_of_both_parts(
    notifier_store, notifier_config, person_event
):
    UserView(notifier_store)(person_event(ANA, email="a@x.org", name=SCRIPT))
    (welcome,) = notifier_store.claim_due(1, 300)
    assert welcome["kind"] == "welcome"
    mail = composer_for(notifier_config).for_delivery(welcome)  # as the sender composes it
    for part in (mail.html, mail.text):
        assert "script" not in part.lower() and "alert" not in part
    assert f"{PERSON_URL}/person/{ANA}/activate?token=" in mail.text


# -- secrets in logs -----------------------------------------------------------------------------
@pytest.fixture
def logging_as_configured() -> Iterator[None]:
    """configure_logging sets logger levels for the whole process: put them back afterwards."""
    names = ("pika",)
    levels = {name: logging.getLogger(name).level for name in names}
    configure_logging("DEBUG")
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def send_three_emails(
    store: NotifierStore, config: NotifierConfig, fake: FakeSendGrid, person_event: Callable
) -> None:
    """Compose (signing links with the secret) and send: one accepted, one refused, one again."""
    fake.then("202", "400", "202")
    view = UserView(store)
    for cpf, email in ((ANA, "ana@example.com"), (BEA, "bea@example.com"), ("3", "c@x.org")):
        view(person_event(cpf, email=email))
    with running(Sender(store, config, transport_for(config))):
        wait_until(
            lambda: (
                {d["status"] for d in store.deliveries(None, 10)} == {"sent", "failed"}
                and fake.requests == 3
            ),
            what="three deliveries settled",
        )


def test_neither_the_sendgrid_key_nor_the_activation_secret_reaches_the_logs(
    notifier_store, notifier_config, fake_sendgrid, logging_as_configured, caplog, person_event
):
    caplog.set_level(logging.DEBUG)
    send_three_emails(notifier_store, notifier_config, fake_sendgrid, person_event)
    assert fake_sendgrid.authorizations == [f"Bearer {SENDGRID_KEY}"] * 3  # the key was used
    assert any(r.levelno == logging.ERROR for r in caplog.records)  # the refusal was logged
    assert SENDGRID_KEY not in caplog.text
    assert SECRET not in caplog.text


def test_the_http_clients_own_debug_lines_are_in_the_logs_searched_for_the_key(
    notifier_store, notifier_config, fake_sendgrid, logging_as_configured, caplog, person_event
):
    """Proof the test above can fail: what the client that calls SendGrid (urllib3) logs about
    each call, at DEBUG, is in the text it searches; the request line, never the headers."""
    caplog.set_level(logging.DEBUG)
    send_three_emails(notifier_store, notifier_config, fake_sendgrid, person_event)
    assert caplog.text.count('"POST /v3/mail/send HTTP/1.1"') == 3
