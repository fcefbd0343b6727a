"""Through Traefik: the item cap answers 422 in the contract's shape, and the stack `make up`
starts prunes the development mailbox by itself."""

from __future__ import annotations

import pytest
from messaging.testing import wait_until

pytestmark = pytest.mark.e2e

CPF = "52998224725"
ITEM = {"type": "salary", "value": 1}


@pytest.fixture(scope="module")
def stack(start_stack):
    return start_stack(
        ITEMS_PER_PERSON_MAX="3",
        MAILBOX_RETENTION_DAYS="0.0001",  # about 9 seconds
        RETENTION_INTERVAL_SECONDS="1",
    )


def register(stack, cpf: str, email: str | None = None) -> None:
    person = {"cpf": cpf, "name": "Ana", "address": "Recife", "date_of_birth": "1990-04-12"}
    status, _, _ = stack.call("POST", "person", "/person", {**person, "email": email})
    assert status == 201


def test_an_item_past_the_cap_is_422_with_message_and_errors(stack):
    register(stack, CPF)
    for kind in ("income", "asset", "debt"):
        status, _, _ = stack.call("POST", "person", f"/person/{CPF}/{kind}", ITEM)
        assert status == 201

    status, body, headers = stack.call("POST", "person", f"/person/{CPF}/income", ITEM)

    assert status == 422
    assert headers["Content-Type"].startswith("application/json")
    assert set(body) == {"message", "errors"}
    assert "ITEMS_PER_PERSON_MAX" in body["errors"]["items"][0]
    _, person, _ = stack.call("GET", "person", f"/person/{CPF}")
    assert len(person["incomes"]) + len(person["assets"]) + len(person["debts"]) == 3


def test_the_mailbox_forgets_an_e_mail_after_its_retention(stack):
    register(stack, "39053344705", "bia@example.com")

    def mails() -> list:
        status, box, _ = stack.call("GET", "notifier", "/mailbox?to=bia@example.com")
        assert status == 200
        return box["messages"]

    wait_until(mails, timeout=60, what="the welcome e-mail")
    wait_until(lambda: mails() == [], timeout=60, what="the e-mail pruned")
