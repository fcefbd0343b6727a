"""The activation token is a contract: what the notifier signs, the person service accepts."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from notifier.email import Composer
from person.activation import Tokens
from person.errors import BadToken

pytestmark = pytest.mark.unit

REGISTERED = datetime(2026, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)


def token_from(link: str) -> str:
    return link.split("token=", 1)[1]


def test_a_notifier_link_is_accepted_by_the_person_service():
    link = Composer("s3cret", "http://person.localhost:8000", 3600).link(
        "11111", "a@b.co", REGISTERED.isoformat()
    )
    claim = Tokens("s3cret", 3600).read(token_from(link), "11111")
    assert (claim.cpf, claim.email, claim.registered_at, claim.expired) == (
        "11111",
        "a@b.co",
        REGISTERED,
        False,
    )


def test_the_registration_time_survives_the_person_services_own_spelling():
    # The notifier signs the created_at the event carries; the person service compares it with
    # its row's, as datetimes: another offset spelling of the same instant is the same.
    spelled = REGISTERED.astimezone().isoformat()
    link = Composer("s3cret", "http://x", 3600).link("11111", "a@b.co", spelled)
    assert Tokens("s3cret", 3600).read(token_from(link), "11111").registered_at == REGISTERED


def test_a_link_signed_with_another_secret_is_refused():
    link = Composer("other", "http://x", 3600).link("11111", "a@b.co", REGISTERED.isoformat())
    with pytest.raises(BadToken):
        Tokens("s3cret", 3600).read(token_from(link), "11111")


def test_a_link_for_another_person_is_refused():
    link = Composer("s3cret", "http://x", 3600).link("22222", "a@b.co", REGISTERED.isoformat())
    with pytest.raises(BadToken):
        Tokens("s3cret", 3600).read(token_from(link), "11111")
