"""The event catalogue is the contract: what the producer publishes, emits and documents, and
what each consumer reads of it, agree."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from datetime import date
from decimal import Decimal
from pathlib import Path

import jsonschema_rs
import pytest
from messaging import Envelope
from messaging.testing import InMemoryBus
from notifier.config import NotifierConfig
from notifier.consumer import UserView
from person.app import create_app
from person.catalogue import CATALOGUE, EXAMPLE_PERSON, EventType, example, person_data
from person.config import PersonConfig
from person.memory import MemoryStore
from score.consumer import HANDLERS as SCORE_HANDLERS

ROOT = Path(__file__).resolve().parents[1]
VALIDATOR = ROOT / "tests" / "asyncapi" / "validate.mjs"
HOOK = ROOT / "docs" / "hooks" / "catalogue.py"


@pytest.fixture(scope="module")
def document() -> dict:
    app = create_app(PersonConfig(app_env="development", api_keys=None), store=MemoryStore())
    answer = app.test_client().get("/asyncapi.json")
    assert answer.status_code == 200
    return answer.get_json()


def payload_validator(document: dict, event_type: str):
    [message] = [m for m in document["components"]["messages"].values() if m["name"] == event_type]
    schema = {**message["payload"], "components": document["components"]}
    return jsonschema_rs.validator_for(schema)


def the_producers_events() -> list[Envelope]:
    """Every kind of write the person service takes, through its own rules."""
    store = MemoryStore()
    fields = {
        "cpf": "1",
        "name": "Ana",
        "address": "Recife",
        "date_of_birth": date(1990, 1, 1),
        "email": "ana@example.com",
    }
    store.create_person(fields, "c")
    store.update_person("1", {"name": "Ana Maria"}, "c")
    for kind in ("income", "asset", "debt"):
        item = store.add_item("1", kind, "t" if kind != "debt" else None, Decimal("0"), "c")
    store.delete_item("1", "debt", str(item["id"]), "c")
    store.request_activation("1", "c")
    person = store.people["1"]
    store.activate("1", person["email"], person["created_at"], "c")
    store.delete_person("1", "c")
    return store.events


@pytest.mark.unit
def test_the_asyncapi_document_parses_with_the_asyncapi_parser(document, tmp_path):
    if not (VALIDATOR.parent / "node_modules").exists():
        pytest.fail("the AsyncAPI parser is not installed: make install (npm ci in tests/asyncapi)")
    path = tmp_path / "asyncapi.json"
    path.write_text(json.dumps(document))
    parsed = subprocess.run(
        ["node", str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120
    )
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    assert f"valid AsyncAPI 3.0.0: {len(CATALOGUE)} messages" in parsed.stdout


@pytest.mark.unit
def test_every_type_the_producer_emits_is_published_and_matches_its_schema(document):
    emitted = the_producers_events()
    assert {e.event_type for e in emitted} == {t.value for t in CATALOGUE}
    for event in emitted:
        errors = list(
            payload_validator(document, event.event_type).iter_errors(event.model_dump(mode="json"))
        )
        assert not errors, (event.event_type, [str(e) for e in errors])


@pytest.mark.unit
def test_each_published_example_is_what_the_producers_code_emits(document):
    messages = {m["name"]: m for m in document["components"]["messages"].values()}
    for event_type in CATALOGUE:
        [published] = messages[event_type.value]["examples"]
        payload = published["payload"]
        assert payload_validator(document, event_type.value).is_valid(payload), event_type
        assert (payload["entity_id"], payload["data"]) == example(event_type)
    person = messages["person.created"]["examples"][0]["payload"]["data"]
    assert person == person_data(EXAMPLE_PERSON).model_dump(mode="json")


@pytest.mark.unit
def test_each_consumer_reads_every_example_of_the_types_it_handles(document):
    """Each consumer's declared handlers translate the producer's own example of every type
    they declare (their payload models accept what the producer publishes)."""
    notifier = UserView(None).handlers
    assert SCORE_HANDLERS.event_types <= {t.value for t in CATALOGUE}
    assert notifier.event_types <= {t.value for t in CATALOGUE}
    for message in document["components"]["messages"].values():
        envelope = Envelope.model_validate_json(json.dumps(message["examples"][0]["payload"]))
        for handlers in (SCORE_HANDLERS, notifier):
            if handlers.handles(envelope.event_type):
                handlers.translate(envelope)


@pytest.mark.integration
def test_an_event_type_the_notifier_does_not_know_is_acknowledged_counted_and_mails_no_one(
    notifier_db, servers, person_event
):
    from notifier.consumer import build
    from psycopg_pool import ConnectionPool

    config = NotifierConfig(notifier_database_url=notifier_db, amqp_url=servers.amqp)
    with ConnectionPool(notifier_db, min_size=1, max_size=2) as pool:
        consumer, store = build(config, pool)
        bus = InMemoryBus()
        bus.attach(consumer)  # the process's own consumer; the bus is only the broker
        suspended = person_event("77").model_copy(update={"event_type": "person.suspended"})
        bus.publish(suspended)
        bus.run_until_idle()
        assert bus.stats(consumer.topology.queue).ignored == 1
        assert store.user("77") is None
        assert store.deliveries(None, 10) == []


@pytest.mark.unit
def test_the_events_page_renders_the_catalogue_the_api_publishes(document):
    """docs/events.md holds no hand-typed table: the site's hook renders the served document."""
    spec = importlib.util.spec_from_file_location("catalogue_hook", HOOK)
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = (ROOT / "docs" / "events.md").read_text()
    assert hook.MARKER in page
    assert hook.published() == document
    rendered = hook.on_page_markdown(page)
    rows = re.findall(r"^\| `([a-z]+\.[a-z_]+)` \|", rendered, flags=re.M)
    assert sorted(rows) == sorted(t.value for t in EventType)
    for event_type in EventType:
        assert f'??? example "`{event_type.value}`"' in rendered
    assert "<cpf>" not in rendered, "an unescaped <cpf> would be an HTML tag"
