"""Every API against its own /openapi.json (schemathesis), over the real PostgreSQL and Redis.

Generated requests, valid and invalid, must never get a 5xx, and every answer must match what
the document promises: a documented status code, its content type and its schema.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
import redis
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from messaging import Envelope
from notifier.app import create_app as notifier_app
from notifier.config import NotifierConfig
from notifier.consumer import UserView
from notifier.email import composer_for
from notifier.migrate import migrate_database as migrate_notifier
from notifier.store import NotifierStore
from person.api import NDJSON
from person.app import create_app as person_app
from person.config import PersonConfig
from person.migrate import migrate_database as migrate_person
from person.store import PgStore
from psycopg_pool import ConnectionPool
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from score.app import create_app as score_app
from score.config import ScoreConfig
from score.store import ItemChange, PersonChange, ScoreStore
from servicekit.auth import digest

pytestmark = pytest.mark.integration

# Every generated request carries a key with every scope, so the routes behind it are fuzzed
# too (tests/e2e/test_security_production.py covers the keys themselves).
FUZZ_KEY = "mk_fuzz-key-with-every-scope"
SCOPES = ["person:write", "person:read", "score:read", "notifier:read", "metrics", "admin"]
API_KEYS = json.dumps({digest(FUZZ_KEY): SCOPES})
AUTH = {"Authorization": f"Bearer {FUZZ_KEY}"}
KNOWN_CPF = "12345678909"
FAILED_DELIVERY, MAIL = 2, 1  # what seed_notifier leaves in a fresh database
KNOWN_PATH_VALUES = {"cpf": KNOWN_CPF, "delivery_id": FAILED_DELIVERY, "mail_id": MAIL}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Bounded so the module runs in well under a minute; derandomized so CI is reproducible.
FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)


def checks_for(case) -> dict:
    """/ready answers a documented 503 here (no broker, no consumer); status_code_conformance
    still holds it to 200 or 503 and its schema."""
    if case.operation.path == "/ready":
        return {"checks": [check for check in CHECKS if check is not not_a_server_error]}
    return {"checks": CHECKS}


def known_ids_sometimes(path_parameters: dict | None) -> st.SearchStrategy:
    """Half the time address the seeded person, e-mail or delivery, so the happy paths run too."""
    known = {k: v for k, v in KNOWN_PATH_VALUES.items() if k in (path_parameters or {})}
    if not known:
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, **known}])


# Valid values for the fields the document can only type loosely (a CPF, a past date, money).
# Swapped into half of the valid bodies, so that the fuzzed text around them reaches the store.
STEERED = {
    "cpf": st.integers(0, 10**14 - 1).map(str),
    "date_of_birth": st.dates(date(1900, 1, 1), date(2020, 12, 31)).map(date.isoformat),
    "value": st.decimals(0, 10**15 - 1, places=2, allow_nan=False).map(str),
    "email": st.none(),
}


def valid_fields_sometimes(case) -> st.SearchStrategy:
    """Keep a negative case as generated: its invalid part is the point of it."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return st.just(case)
    if not isinstance(case.body, dict) or not STEERED.keys() & case.body.keys():
        return st.just(case)
    fields = st.fixed_dictionaries({k: STEERED[k] for k in STEERED.keys() & case.body.keys()})
    return st.one_of(st.just(case), fields.map(lambda valid: _with_body(case, valid)))


def _with_body(case, fields: dict):
    case.body = {**case.body, **fields}
    return case


@schemathesis.serializer(NDJSON)
def ndjson(_context, value) -> bytes:
    """POST /person/bulk takes NDJSON too: one generated item a line (anything else, as is)."""
    items = value if isinstance(value, list) else [value]
    return "\n".join(json.dumps(item) for item in items).encode()


def served_schema(app) -> schemathesis.BaseSchema:
    """The schema an app serves at /openapi.json, with the generation steered as above."""
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)

    @schema.hook
    def flatmap_path_parameters(_context, path_parameters):
        return known_ids_sometimes(path_parameters)

    @schema.hook
    def flatmap_case(_context, case):
        return valid_fields_sometimes(case)

    return schema


# Loaded at import, since pytest parametrizes from them: each from its app over a store that is
# never opened (the document does not depend on the data; nothing connects at import). Every
# call then goes to the app a fixture builds over the real store (app=...), which serves the
# same document (test_the_fuzzed_documents_are_the_ones_the_apps_serve).
DEV = {"app_env": "development", "api_keys": API_KEYS}  # whatever the environment says
PERSON = served_schema(
    person_app(PersonConfig(**DEV), store=PgStore(ConnectionPool("", open=False)))
)
SCORE = served_schema(score_app(ScoreConfig(**DEV), store=ScoreStore(redis.Redis())))
NOTIFIER = served_schema(
    notifier_app(
        NotifierConfig(**DEV, sendgrid_api_key=None), NotifierStore(ConnectionPool("", open=False))
    )
)


@pytest.fixture(scope="module")
def refusing_broker() -> Iterator[str]:
    """An AMQP URL whose port refuses at once: the broker is not under test here, and a local
    one that CI stops at times would make /ready slow and its answer vary from run to run."""
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        yield f"amqp://guest:guest@127.0.0.1:{bound_not_listening.getsockname()[1]}/%2F"


# -- person ------------------------------------------------------------------------------------
KNOWN_PERSON = {
    "cpf": KNOWN_CPF,
    "name": "Maria",
    "address": "Recife",
    "date_of_birth": "1990-04-12",
    "email": "maria@example.com",
}


@pytest.fixture(scope="module")
def person_on_postgres(make_database, refusing_broker) -> Iterator[Flask]:
    url = make_database("fuzz_person")
    migrate_person(url)
    config = PersonConfig(
        **DEV,
        person_database_url=url,
        amqp_url=refusing_broker,
        activation_secret="fuzz-secret",
        max_body_bytes=16 * 1024,
        activation_resend_seconds=0,
    )
    with ConnectionPool(url, min_size=1, max_size=4) as pool:
        yield person_app(config, store=PgStore(pool))


@pytest.fixture
def person_api(person_on_postgres) -> Flask:
    """The app, with the known person registered again if an earlier operation deleted it."""
    client = person_on_postgres.test_client()
    if client.get(f"/person/{KNOWN_CPF}", headers=AUTH).status_code == 404:
        assert client.post("/person", json=KNOWN_PERSON, headers=AUTH).status_code == 201
    return person_on_postgres


@PERSON.parametrize()
@FUZZ
def test_person_api_keeps_its_openapi_promises(case, person_api):
    case.call_and_validate(app=person_api, **checks_for(case))


# -- score -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def score_api(servers, refusing_broker) -> Iterator[Flask]:
    client = redis.Redis.from_url(servers.redis)
    store = ScoreStore(client, prefix=f"fuzz-{uuid.uuid4().hex[:8]}:")
    store.apply(
        [
            PersonChange(KNOWN_CPF, 1, False),
            ItemChange(str(uuid.uuid4()), 1, False, KNOWN_CPF, "income", Decimal("1000.00")),
            ItemChange(str(uuid.uuid4()), 1, False, KNOWN_CPF, "debt", Decimal("20.00")),
        ]
    )
    try:
        yield score_app(ScoreConfig(**DEV, amqp_url=refusing_broker), store=store)
    finally:
        store.wipe()
        client.close()


@SCORE.parametrize()
@FUZZ
def test_score_api_keeps_its_openapi_promises(case, score_api):
    case.call_and_validate(app=score_api, **checks_for(case))


# -- notifier ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def notifier_api(make_database, refusing_broker) -> Iterator[Flask]:
    url = make_database("fuzz_notifier")
    migrate_notifier(url)
    config = NotifierConfig(
        **DEV,
        notifier_database_url=url,
        amqp_url=refusing_broker,
        sendgrid_api_key=None,
        activation_secret="fuzz-secret",
        public_person_url="http://person.test",
    )
    with ConnectionPool(url, min_size=1, max_size=4) as pool:
        store = NotifierStore(pool)
        seed_notifier(store, config)
        yield notifier_app(config, store)


def seed_notifier(store: NotifierStore, config: NotifierConfig) -> None:
    """A user with a welcome e-mail in the mailbox, and one failed delivery to retry."""
    now = datetime.now(UTC).isoformat()
    view = UserView(store)
    for cpf, email in ((KNOWN_CPF, "maria@example.com"), ("22222", "joao@example.com")):
        view(
            Envelope.new(
                event_type="person.created",
                entity_id=cpf,
                entity_version=1,
                producer="person",
                data={
                    "cpf": cpf,
                    "name": "Maria",
                    "email": email,
                    "status": "pending",
                    "created_at": now,
                    "updated_at": now,
                },
            )
        )
    store.deliver_due_to_mailbox(
        1, 300, config.email_from, composer_for(config).for_delivery
    )  # the first to the mailbox
    (failed,) = store.claim_due(1, 300)
    store.mark_failed(failed, "HTTP 400: bad address")
    assert (failed["id"], store.mailbox(1)[0]["id"]) == (FAILED_DELIVERY, MAIL)


class FuzzKey:
    """The key on every generated request, except where a case drops it on purpose."""

    def get(self, _case, _context) -> str:
        return FUZZ_KEY

    def set(self, case, key: str, _context) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}


for _schema in (PERSON, SCORE, NOTIFIER):
    _schema.auth()(FuzzKey)


@NOTIFIER.parametrize()
@FUZZ
def test_notifier_api_keeps_its_openapi_promises(case, notifier_api):
    case.call_and_validate(app=notifier_api, **checks_for(case))


ODD_NUMBERS = ["²", "①", "٣", "\uff11", "1e3", "-1", " 5", "5 ", "0x10", "9" * 40, "", "1.5"]


@pytest.mark.parametrize("value", ODD_NUMBERS)
def test_odd_values_of_numeric_query_parameters_are_refused_with_4xx_never_5xx(
    person_on_postgres, notifier_api, value
):
    """What schemathesis did not generate: Unicode digits that str.isdigit accepts and int()
    may not, and other values of no integer's spelling."""
    person, notifier = person_on_postgres.test_client(), notifier_api.test_client()
    for client, path in (
        (person, f"/imports/00000000-0000-0000-0000-000000000000?limit={value}"),
        (notifier, f"/mailbox?limit={value}"),
        (notifier, f"/deliveries?limit={value}"),
    ):
        answer = client.get(path, headers=AUTH)
        assert 400 <= answer.status_code < 500, (path, answer.status_code)


def test_the_fuzzed_documents_are_the_ones_the_apps_serve(
    person_on_postgres, score_api, notifier_api
):
    for schema, app in ((PERSON, person_on_postgres), (SCORE, score_api), (NOTIFIER, notifier_api)):
        assert app.test_client().get("/openapi.json").get_json() == schema.raw_schema
