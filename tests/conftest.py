"""Fixtures of the cross-service tests: every service's store on its own fresh database."""

from __future__ import annotations

import pytest
from notifier.migrate import migrate_database as migrate_notifier
from person.migrate import migrate_database as migrate_person


@pytest.fixture
def person_db(make_database) -> str:
    url = make_database("person")
    migrate_person(url)
    return url


@pytest.fixture
def notifier_db(make_database) -> str:
    url = make_database("notifier")
    migrate_notifier(url)
    return url
