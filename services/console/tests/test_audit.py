"""The audit log records an action before it runs and its outcome after (an action it cannot
record does not happen), and every view of a journey, whose pages show personal data."""

from __future__ import annotations

import psycopg
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def operator(make_app, browse, keys, notifier_api):
    browser = browse(make_app(notifier_api_url=notifier_api.url))
    browser.sign_in(keys["admin"])
    return browser


def retry(browser, delivery: int = 7):
    return browser.post(f"/emails/{delivery}/retry", data={"csrf": browser.token("/journey")})


def actions(browser, action: str) -> list[dict]:
    return [r for r in browser.audit() if r["action"] == action]


def test_an_action_is_recorded_before_it_runs_and_with_its_outcome_after(operator, notifier_api):
    meanwhile: list[list[dict]] = []
    notifier_api.on_call = lambda: meanwhile.append(actions(operator, "retry e-mail"))
    assert retry(operator).status_code == 302
    [[intent]] = meanwhile  # what the log held while the notifier was being asked
    assert intent["phase"] == "intent" and intent["target"] == "delivery 7"
    assert intent["who"].startswith("key ")
    rows = actions(operator, "retry e-mail")
    assert [(r["phase"], r["intent"], r["count"]) for r in rows] == [
        ("intent", None, 1),
        ("done", intent["id"], 1),
    ]
    assert rows[1]["detail"] == "queued again"


def test_an_action_the_log_cannot_record_does_not_happen(
    operator, notifier_api, console_db, administrator
):
    token = operator.token("/journey")
    with psycopg.connect(administrator(console_db)) as conn:  # the audit log refuses new rows
        conn.execute("ALTER TABLE audit ADD CONSTRAINT closed CHECK (false) NOT VALID")
    answer = operator.post("/emails/7/retry", data={"csrf": token})
    assert answer.status_code == 500
    assert notifier_api.calls == []


def test_an_action_that_is_refused_or_fails_is_recorded_as_failed(
    make_app, browse, keys, notifier_api
):
    notifier_api.status = 409
    operator = browse(make_app(notifier_api_url=notifier_api.url))
    operator.sign_in(keys["admin"])
    retry(operator)
    down = browse(make_app())  # the notifier's API does not answer at all
    down.sign_in(keys["admin"])
    assert retry(down).status_code == 500
    rows = actions(operator, "retry e-mail")
    assert [(r["phase"], r["count"]) for r in rows] == [
        ("intent", 1),
        ("failed", 0),
        ("intent", 1),
        ("failed", 0),
    ]
    assert rows[3]["detail"].startswith("Unreachable: notifier did not answer")
    assert rows[1]["intent"] == rows[0]["id"] and rows[3]["intent"] == rows[2]["id"]


@pytest.fixture
def journeys(make_app, browse, keys, broker, person_api):
    """An operator on a console that follows journeys in the person API's outbox and a broker."""
    app = make_app(
        person_api_url=person_api.url, amqp_url=broker.amqp_url, events_exchange=broker.exchange
    )
    browser = browse(app)
    browser.sign_in(keys["admin"])
    return browser


def test_each_view_of_a_journey_is_audited_with_whose_it_is(journeys, person_api):
    cpf = "12345678909"
    person_api.add("person.created", cpf)
    page = journeys.get("/journey", query_string={"q": cpf}).get_data(as_text=True)
    assert "person.created" in page
    [row] = actions(journeys, "view journey")
    assert row["target"] == cpf and row["count"] == 1 and row["who"].startswith("key ")
    assert row["detail"].startswith(f"cpf {cpf}")
    journeys.get("/journey")  # the empty form shows nobody: nothing to record
    assert len(actions(journeys, "view journey")) == 1


def test_a_journey_the_log_cannot_record_is_not_shown(
    journeys, person_api, console_db, administrator
):
    cpf = "12345678909"
    person_api.add("person.created", cpf)
    with psycopg.connect(administrator(console_db)) as conn:
        conn.execute("ALTER TABLE audit ADD CONSTRAINT closed CHECK (false) NOT VALID")
    answer = journeys.get("/journey", query_string={"q": cpf})
    assert answer.status_code == 500 and "person.created" not in answer.get_data(as_text=True)


def test_the_audit_page_shows_each_intent_and_its_outcome(operator):
    retry(operator)
    page = operator.get("/audit").get_data(as_text=True)
    assert ">intent</td>" in page and ">done (of #" in page
