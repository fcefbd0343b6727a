"""The console reads the producer's outbox through the person API (GET /outbox and
GET /outbox/history, with its own key), never the person database."""

from __future__ import annotations

import pytest
from console.config import ConsoleConfig

pytestmark = pytest.mark.integration

CPF = "12345678909"


@pytest.fixture
def operator(make_app, browse, keys, broker, person_api):
    app = make_app(
        person_api_url=person_api.url,
        console_api_key="mk_the-consoles-own-key",
        amqp_url=broker.amqp_url,
        events_exchange=broker.exchange,
    )
    browser = browse(app)
    browser.sign_in(keys["admin"])
    return browser


def test_the_console_has_no_setting_for_another_services_database():
    assert not [name for name in ConsoleConfig.model_fields if name.startswith("person_database")]


def test_the_overview_shows_the_outbox_as_the_person_api_reports_it(operator, person_api):
    person_api.outbox.update(
        backlog=4,
        oldest_age_seconds=2.5,
        published=120,
        parked_count=11,
        parked=[
            {
                "id": 77,
                "event_id": "00000000-0000-4000-8000-000000000077",
                "event_type": "person.updated",
                "entity": "person",
                "entity_id": CPF,
                "entity_version": 3,
                "occurred_at": "2026-12-07T10:00:00+00:00",
                "parked_at": "2026-12-07T10:00:01.123456+00:00",
                "parked_reason": "frame too large",
                "superseded_by": 4,
            }
        ],
    )

    page = operator.get("/overview/live").get_data(as_text=True)

    assert '<strong id="backlog">4</strong>' in page and "oldest unpublished 2.5 s" in page
    assert "published 120" in page and '<strong id="parked">11</strong>' in page
    assert "#77" in page and "frame too large" in page and "v4 published since" in page
    assert "2026-12-07T10:00:01+00:00" in page
    [(path, authorization)] = [c for c in person_api.calls if c[0].startswith("/outbox")]
    assert path == "/outbox?parked=10"
    assert authorization == "Bearer mk_the-consoles-own-key"


def test_an_outbox_the_person_api_does_not_show_is_a_problem_on_the_overview(operator, person_api):
    person_api.status = 403

    page = operator.get("/overview/live").get_data(as_text=True)

    assert "outbox: person answered 403 to GET /outbox" in page
    assert '<p class="bad">unreachable</p>' in page


def test_a_journey_by_request_follows_the_person_it_changed(operator, person_api):
    person_api.add("person.created", CPF, correlation_id="req-1")
    item = "7a56e467-afa8-43ea-9ab8-fb97bdec914a"
    person_api.add("income.created", item, cpf=CPF, correlation_id="req-2")

    page = operator.get("/journey", query_string={"q": "req-1"}).get_data(as_text=True)

    assert "person.created" in page and "income.created" in page and item in page
    assert [path for path, _ in person_api.calls if path.startswith("/outbox")] == [
        "/outbox/history?correlation_id=req-1",
        f"/outbox/history?cpf={CPF}",
    ]


def test_a_journey_without_the_person_api_says_why_instead_of_failing(make_app, browse, keys):
    browser = browse(make_app())  # every API closed
    browser.sign_in(keys["admin"])

    answer = browser.get("/journey", query_string={"q": CPF})

    assert answer.status_code == 503
    assert "person did not answer" in answer.get_data(as_text=True)


def test_a_query_no_event_can_match_finds_nothing(operator, person_api):
    person_api.status = 422  # a CPF of more than 14 digits

    page = operator.get("/journey", query_string={"q": "1" * 20}).get_data(as_text=True)

    assert f"Nothing in the outbox for {'1' * 20}" in page
