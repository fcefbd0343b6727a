"""Kinds of e-mail are data (email.KINDS): a kind declared there, with its templates, is recorded,
decided and delivered like the welcome, with no change to the consumer, the store or the schema."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from notifier import email
from notifier.consumer import UserView
from notifier.email import KINDS, PERSON_UPDATED, Kind, composer_for, registration_time

pytestmark = pytest.mark.integration

REGISTERED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).isoformat()
ACTIVATED = Kind(
    "Your account is active",
    on=(PERSON_UPDATED,),
    html="welcome.html",  # a real kind has templates of its own; any will do here
    text="welcome.txt",
    when=lambda person: person.status == "active",
    once=True,
)


def test_a_kind_declared_only_in_the_table_is_recorded_once_per_registration_and_delivered(
    monkeypatch, person_event, store, config
):
    monkeypatch.setitem(email.KINDS, "activated", ACTIVATED)
    view = UserView(store)

    view(person_event("9", 1, "created", created_at=REGISTERED))
    view(person_event("9", 2, "updated", created_at=REGISTERED, status="pending"))
    activated = person_event("9", 3, "updated", created_at=REGISTERED, status="active")
    view(activated)
    view(activated)  # delivered again
    view(person_event("9", 4, "updated", created_at=REGISTERED, status="active", name="Bia"))

    found = sorted(store.deliveries(None, 10), key=lambda d: d["id"])
    assert [(d["kind"], d["subject"], d["status"]) for d in found] == [
        ("welcome", "Welcome! Activate your account", "pending"),
        ("activated", "Your account is active", "pending"),
    ]
    sent = store.deliver_due_to_mailbox(
        10, 300, "no-reply@example.com", composer_for(config).for_delivery
    )
    assert len(sent) == 2
    assert [m["subject"] for m in store.mailbox(10)] == [
        "Your account is active",
        "Welcome! Activate your account",
    ]


def test_a_kind_without_a_link_is_composed_without_one(monkeypatch, config):
    monkeypatch.setitem(
        email.KINDS, "plain", Kind("A note", on=(), html="welcome.html", text="welcome.txt")
    )
    mail = composer_for(config).compose("plain", "9", "Ana", "ana@example.com", REGISTERED)
    assert mail.link is None and "/activate?token=" not in mail.text


def test_each_kind_has_a_subject_both_templates_and_its_link_in_them(config):
    composer = composer_for(config)
    for name, kind in KINDS.items():
        mail = composer.compose(name, "9", "Ana", "ana@example.com", REGISTERED)
        assert mail.subject == kind.subject and kind.on and mail.text and mail.html, name
        if kind.link is None:
            assert mail.link is None, name
        else:
            assert mail.link and mail.link in mail.text, name
            assert mail.link.replace("&", "&amp;") in mail.html, name


def test_the_database_keeps_only_a_kinds_name_not_the_list_of_kinds(notifier_db):
    row = (
        "INSERT INTO deliveries (kind, cpf, event_id, to_email, subject, html, text) "
        "VALUES (%s, '9', gen_random_uuid(), 'a@b.co', 's', 'h', 't')"
    )
    with psycopg.connect(notifier_db) as conn:
        conn.execute(row, ("a_new_kind",))
    for refused in ("", "Welcome", "two words", "x" * 41, "welcome'; --"):
        with psycopg.connect(notifier_db) as conn, pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(row, (refused,))


def test_a_kind_not_once_per_registration_goes_once_per_event(
    monkeypatch, person_event, store, config
):
    monkeypatch.setitem(email.KINDS, "activated", replace(ACTIVATED, once=False))
    view = UserView(store)
    view(person_event("8", 1, "created", created_at=REGISTERED))
    for version in (2, 3):
        view(person_event("8", version, "updated", created_at=REGISTERED, status="active"))
    kinds = [d["kind"] for d in sorted(store.deliveries(None, 10), key=lambda d: d["id"])]
    assert kinds == ["welcome", "activated", "activated"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.datetimes(timezones=st.timezones()).map(datetime.isoformat)))
def test_a_registration_time_is_read_as_one_instant_in_utc_or_refused_with_why(text):
    """Any text an event or a row may carry: a ValueError saying why, or the same instant in
    UTC (never another exception, which would retry the event instead of dead-lettering it)."""
    try:
        read = registration_time(text)
    except ValueError as exc:
        assert "registration's time" in str(exc)
        return
    assert datetime.fromisoformat(read) == datetime.fromisoformat(text)
    assert read.endswith("+00:00")
