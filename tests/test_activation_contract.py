"""The activation token is a contract: what the notifier signs, the person service accepts."""

from __future__ import annotations

import pytest
from notifier.email import Composer
from person.activation import Tokens
from person.errors import BadToken

pytestmark = pytest.mark.unit


def token_from(link: str) -> str:
    return link.split("token=", 1)[1]


def test_a_notifier_link_is_accepted_by_the_person_service():
    link = Composer("s3cret", "http://person.localhost:8000", 3600).link("11111", "a@b.co")
    claim = Tokens("s3cret", 3600).read(token_from(link), "11111")
    assert (claim.cpf, claim.email, claim.expired) == ("11111", "a@b.co", False)


def test_a_link_signed_with_another_secret_is_refused():
    link = Composer("other", "http://x", 3600).link("11111", "a@b.co")
    with pytest.raises(BadToken):
        Tokens("s3cret", 3600).read(token_from(link), "11111")


def test_a_link_for_another_person_is_refused():
    link = Composer("s3cret", "http://x", 3600).link("22222", "a@b.co")
    with pytest.raises(BadToken):
        Tokens("s3cret", 3600).read(token_from(link), "11111")
