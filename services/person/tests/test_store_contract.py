"""The store contract: MemoryStore and PgStore answer and emit events the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from messaging import Envelope, decode
from person.catalogue import person_data
from person.errors import BadToken, Conflict, NotFound, TooSoon, Unprocessable
from person.service import Quota, Store

CPF = "11111"
OTHER_CPF = "22222"


def fields(cpf: str = CPF, **overrides: Any) -> dict[str, Any]:
    """What the API hands create_person after validation."""
    return {
        "cpf": cpf,
        "name": "abc",
        "address": "abc",
        "date_of_birth": date(2019, 6, 15),
        "email": "ana@example.com",
        **overrides,
    }


def registered(subject: Subject) -> Any:
    """When the person with CPF registered (activation links are bound to it)."""
    return subject.store.get_person(CPF)["created_at"]


@dataclass
class Subject:
    """A store under test and the events it produced so far, oldest first."""

    store: Store
    read_events: Callable[[], list[Envelope]]

    def events(self) -> list[Envelope]:
        return self.read_events()

    def mark(self) -> int:
        return len(self.events())

    def since(self, mark: int) -> list[Envelope]:
        return self.events()[mark:]


def _outbox_reader(database_url: str) -> Callable[[], list[Envelope]]:
    def read() -> list[Envelope]:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute("SELECT body FROM messaging_outbox ORDER BY id").fetchall()
        return [decode(body) for (body,) in rows]

    return read


@pytest.fixture(
    params=[
        pytest.param("memory", marks=pytest.mark.unit),
        pytest.param("postgres", marks=pytest.mark.integration),
    ]
)
def store(request: pytest.FixtureRequest) -> Subject:
    if request.param == "memory":
        memory = request.getfixturevalue("memory_store")
        return Subject(memory, lambda: list(memory.events))
    return Subject(
        request.getfixturevalue("pg_store"),
        _outbox_reader(request.getfixturevalue("person_db")),
    )


# -- people ------------------------------------------------------------------------------------
def test_a_created_person_reads_back_pending_with_empty_item_lists(store: Subject):
    created = store.store.create_person(fields(), "c-1")

    got = store.store.get_person(CPF)

    assert got == created
    assert {k: got[k] for k in ("cpf", "name", "address", "date_of_birth", "email")} == fields()
    assert got["status"] == "pending"
    assert (got["incomes"], got["assets"], got["debts"]) == ([], [], [])
    [event] = store.events()
    assert event.event_type == "person.created"
    assert (event.entity, event.entity_id, event.entity_version) == ("person", CPF, 1)
    assert event.producer == "person"
    assert event.data == person_data(got).model_dump(mode="json")
    assert event.data["date_of_birth"] == "2019-06-15"


def test_getting_an_unknown_person_raises_not_found(store: Subject):
    with pytest.raises(NotFound):
        store.store.get_person(CPF)


def test_creating_a_person_with_an_existing_cpf_conflicts_and_emits_nothing(store: Subject):
    store.store.create_person(fields(), None)
    mark = store.mark()

    with pytest.raises(Conflict):
        store.store.create_person(fields(name="someone else"), None)

    assert store.since(mark) == []
    assert store.store.get_person(CPF)["name"] == "abc"


def test_registering_many_registers_each_as_create_person_does(store: Subject):
    store.store.create_person(fields(OTHER_CPF), None)
    mark = store.mark()
    third = "33333"
    batch = [fields(), fields(OTHER_CPF), fields(name="a twin"), fields(third, email=None)]

    outcome = store.store.register_many(batch, "import-1")

    for person, cpf in ((outcome[0], CPF), (outcome[3], third)):
        assert person.items() <= store.store.get_person(cpf).items()
    assert outcome[0]["status"] == "pending" and outcome[3]["email"] is None
    assert [str(c) for c in outcome[1:3] if isinstance(c, Conflict)] == [
        f"a person with CPF {OTHER_CPF} already exists",
        f"a person with CPF {CPF} already exists",  # the first of the batch wins
    ]
    assert store.store.get_person(CPF)["name"] == "abc"
    events = sorted(store.since(mark), key=lambda e: e.entity_id)
    assert [(e.event_type, e.entity_id, e.entity_version) for e in events] == [
        ("person.created", CPF, 1),
        ("person.created", third, 1),
    ]
    assert {e.correlation_id for e in events} == {"import-1"}
    for event in events:
        assert event.data == person_data(store.store.get_person(event.entity_id)).model_dump(
            mode="json"
        )


def test_registering_none_emits_nothing(store: Subject):
    assert store.store.register_many([], None) == []
    assert store.events() == []


def test_an_update_emits_person_updated_with_the_next_version_and_the_full_state(
    store: Subject,
):
    store.store.create_person(fields(), None)

    updated = store.store.update_person(CPF, {"name": "new name", "address": "elsewhere"}, None)

    assert updated["name"] == "new name"
    assert updated["address"] == "elsewhere"
    assert store.store.get_person(CPF) == updated
    [event] = store.since(1)
    assert event.event_type == "person.updated"
    assert (event.entity_id, event.entity_version) == (CPF, 2)
    assert event.data == person_data(updated).model_dump(mode="json")
    assert event.data["email"] == "ana@example.com"  # full state, not just the changed fields


def test_an_update_that_changes_nothing_emits_nothing(store: Subject):
    store.store.create_person(fields(), None)
    mark = store.mark()

    same = store.store.update_person(CPF, {"name": "abc", "date_of_birth": date(2019, 6, 15)}, None)

    assert same["name"] == "abc"
    assert store.since(mark) == []


def test_updating_an_unknown_person_raises_not_found(store: Subject):
    with pytest.raises(NotFound):
        store.store.update_person(CPF, {"name": "x"}, None)
    assert store.events() == []


# -- items -------------------------------------------------------------------------------------
def test_adding_an_item_to_an_unknown_person_raises_not_found(store: Subject):
    with pytest.raises(NotFound):
        store.store.add_item(CPF, "income", "renting", Decimal("1000"), None)
    assert store.events() == []


@pytest.mark.parametrize(
    ("kind", "type_"), [("income", "renting"), ("asset", "apartment"), ("debt", None)]
)
def test_adding_and_deleting_an_item_emits_its_created_then_deleted_event(
    store: Subject, kind: str, type_: str | None
):
    store.store.create_person(fields(), None)
    mark = store.mark()

    item = store.store.add_item(CPF, kind, type_, Decimal("1000"), None)
    item_id = str(item["id"])

    assert store.store.get_person(CPF)[f"{kind}s"] == [
        {"id": item_id, "type": type_, "value": "1000.00"}
    ]
    [created] = store.since(mark)
    assert created.event_type == f"{kind}.created"
    assert (created.entity, created.entity_id, created.entity_version) == (kind, item_id, 1)
    assert created.data == {
        "id": item_id,
        "cpf": CPF,
        "kind": kind,
        "type": type_,
        "value": "1000.00",
    }

    store.store.delete_item(CPF, kind, item_id, None)

    assert store.store.get_person(CPF)[f"{kind}s"] == []
    [deleted] = store.since(mark + 1)
    assert deleted.event_type == f"{kind}.deleted"
    assert (deleted.entity_id, deleted.entity_version) == (item_id, 2)
    assert deleted.data is None


@pytest.mark.parametrize(
    ("kind", "cpf"), [("asset", CPF), ("income", OTHER_CPF)], ids=["wrong-kind", "wrong-cpf"]
)
def test_deleting_an_item_by_the_wrong_kind_or_cpf_raises_not_found_and_keeps_it(
    store: Subject, kind: str, cpf: str
):
    store.store.create_person(fields(), None)
    store.store.create_person(fields(OTHER_CPF), None)
    item = store.store.add_item(CPF, "income", "renting", Decimal("1000"), None)
    mark = store.mark()

    with pytest.raises(NotFound):
        store.store.delete_item(cpf, kind, str(item["id"]), None)

    assert store.since(mark) == []
    assert [i["id"] for i in store.store.get_person(CPF)["incomes"]] == [str(item["id"])]


def test_deleting_an_unknown_item_raises_not_found(store: Subject):
    store.store.create_person(fields(), None)
    with pytest.raises(NotFound):
        store.store.delete_item(CPF, "income", "00000000-0000-0000-0000-000000000000", None)


def test_an_item_past_the_cap_raises_unprocessable_and_emits_nothing(store: Subject):
    store.store.items_per_person_max = 3
    store.store.create_person(fields(), None)
    store.store.create_person(fields(OTHER_CPF), None)
    kept = [
        store.store.add_item(CPF, kind, None, Decimal("1"), None)
        for kind in ("income", "asset", "debt")
    ]
    mark = store.mark()

    with pytest.raises(Unprocessable) as refused:
        store.store.add_item(CPF, "debt", None, Decimal("1"), None)

    assert refused.value.field == "items"
    assert "ITEMS_PER_PERSON_MAX" in refused.value.reason
    assert store.since(mark) == []
    person = store.store.get_person(CPF)
    assert sum(len(person[f"{k}s"]) for k in ("income", "asset", "debt")) == 3
    store.store.add_item(OTHER_CPF, "income", None, Decimal("1"), None)  # the cap is per person
    store.store.delete_item(CPF, "income", str(kept[0]["id"]), None)
    store.store.add_item(CPF, "income", None, Decimal("2"), None)  # room again after a deletion


# -- deletion and re-creation ------------------------------------------------------------------
def test_deleting_a_person_emits_each_items_deletion_before_the_persons(store: Subject):
    store.store.create_person(fields(), None)
    items = {
        str(store.store.add_item(CPF, kind, type_, Decimal(value), None)["id"]): kind
        for kind, type_, value in [
            ("income", "renting", "1000"),
            ("asset", "apartment", "100000"),
            ("debt", None, "1000"),
        ]
    }
    mark = store.mark()

    store.store.delete_person(CPF, None)

    *item_events, last = store.since(mark)
    assert {e.entity_id: e.entity for e in item_events} == items
    assert all(e.change == "deleted" and e.data is None for e in item_events)
    assert all(e.entity_version == 2 for e in item_events)
    assert last.event_type == "person.deleted"
    assert (last.entity_id, last.entity_version, last.data) == (CPF, 2, None)
    with pytest.raises(NotFound):
        store.store.get_person(CPF)


def test_deleting_an_unknown_person_raises_not_found(store: Subject):
    with pytest.raises(NotFound):
        store.store.delete_person(CPF, None)
    assert store.events() == []


def test_a_re_created_person_continues_the_version_past_its_tombstone(store: Subject):
    store.store.create_person(fields(), None)  # v1
    store.store.delete_person(CPF, None)  # v2, the consumers' tombstone
    mark = store.mark()

    again = store.store.create_person(fields(name="again"), None)

    [event] = store.since(mark)
    assert event.event_type == "person.created"
    assert (event.entity_id, event.entity_version) == (CPF, 3)
    assert event.data == person_data(again).model_dump(mode="json")
    assert store.store.get_person(CPF)["name"] == "again"


# -- activation --------------------------------------------------------------------------------
def test_activating_with_another_email_raises_bad_token_and_emits_nothing(store: Subject):
    store.store.create_person(fields(), None)
    mark = store.mark()

    with pytest.raises(BadToken):
        store.store.activate(CPF, "someone@example.com", registered(store), None)

    assert store.since(mark) == []
    assert store.store.get_person(CPF)["status"] == "pending"


def test_activating_a_person_without_email_raises_bad_token(store: Subject):
    store.store.create_person(fields(email=None), None)
    with pytest.raises(BadToken):
        store.store.activate(CPF, "ana@example.com", registered(store), None)


def test_activating_with_the_right_email_emits_an_update_once_then_answers_false(
    store: Subject,
):
    store.store.create_person(fields(), None)
    mark = store.mark()

    assert store.store.activate(CPF, "ana@example.com", registered(store), None) is True

    person = store.store.get_person(CPF)
    assert person["status"] == "active"
    [event] = store.since(mark)
    assert event.event_type == "person.updated"
    assert event.entity_version == 2
    assert event.data == person_data(person).model_dump(mode="json")
    assert event.data["status"] == "active"

    assert store.store.activate(CPF, "ana@example.com", registered(store), None) is False
    assert store.since(mark + 1) == []


def test_requesting_activation_without_email_is_unprocessable(store: Subject):
    store.store.create_person(fields(email=None), None)
    mark = store.mark()

    with pytest.raises(Unprocessable) as raised:
        store.store.request_activation(CPF, None)

    assert raised.value.field == "email"
    assert store.since(mark) == []


def test_requesting_activation_of_an_active_person_conflicts(store: Subject):
    store.store.create_person(fields(), None)
    store.store.activate(CPF, "ana@example.com", registered(store), None)
    mark = store.mark()

    with pytest.raises(Conflict):
        store.store.request_activation(CPF, None)

    assert store.since(mark) == []


def test_requesting_activation_emits_activation_requested_with_the_persons_state(
    store: Subject,
):
    store.store.create_person(fields(), None)
    mark = store.mark()

    store.store.request_activation(CPF, None)

    [event] = store.since(mark)
    assert event.event_type == "person.activation_requested"
    assert (event.entity, event.entity_id, event.entity_version) == ("person", CPF, 2)
    assert event.data == person_data(store.store.get_person(CPF)).model_dump(mode="json")


def test_a_keys_activation_requests_stop_at_its_daily_quota_and_refusals_spend_none(
    store: Subject,
):
    for cpf in ("1", "2", "3", "4"):
        store.store.create_person(fields(cpf), None)
    store.store.activate("4", "ana@example.com", store.store.get_person("4")["created_at"], None)
    quota = Quota("key-a", 2)
    with pytest.raises(Conflict):  # refused for another reason: nothing spent
        store.store.request_activation("4", None, quota=quota)
    mark = store.mark()

    store.store.request_activation("1", None, quota=quota)
    store.store.request_activation("2", None, quota=quota)
    with pytest.raises(TooSoon) as refused:
        store.store.request_activation("3", None, quota=quota)
    store.store.request_activation("3", None, quota=Quota("key-b", 2))  # another key's own

    assert 0 < refused.value.retry_after <= 86_400  # the next UTC day
    assert "ACTIVATION_REQUESTS_PER_KEY_PER_DAY" in str(refused.value)
    assert [e.entity_id for e in store.since(mark)] == ["1", "2", "3"]


def test_requesting_activation_of_an_unknown_person_raises_not_found(store: Subject):
    with pytest.raises(NotFound):
        store.store.request_activation(CPF, None)


# -- correlation -------------------------------------------------------------------------------
def test_every_event_carries_the_correlation_id_of_the_call_that_caused_it(store: Subject):
    s = store.store
    s.create_person(fields(), "create")
    s.update_person(CPF, {"name": "renamed"}, "update")
    item = s.add_item(CPF, "income", "renting", Decimal("1000"), "add")
    s.delete_item(CPF, "income", str(item["id"]), "remove")
    s.request_activation(CPF, "request")
    s.activate(CPF, "ana@example.com", registered(store), "activate")
    kept = s.add_item(CPF, "debt", None, Decimal("5"), "add-debt")
    s.delete_person(CPF, "delete")

    assert [(e.event_type, e.correlation_id) for e in store.events()] == [
        ("person.created", "create"),
        ("person.updated", "update"),
        ("income.created", "add"),
        ("income.deleted", "remove"),
        ("person.activation_requested", "request"),
        ("person.updated", "activate"),
        ("debt.created", "add-debt"),
        ("debt.deleted", "delete"),
        ("person.deleted", "delete"),
    ]
    assert store.events()[-2].entity_id == str(kept["id"])


def test_an_event_without_correlation_id_carries_none(store: Subject):
    store.store.create_person(fields(), None)
    [event] = store.events()
    assert event.correlation_id is None


def test_a_registration_event_keeps_names_that_spell_its_placeholders(store: Subject):
    """The PostgreSQL store writes a registration's event in one statement, filling in the
    version and the timestamps in the body's text: a name spelling those places stays as it is."""
    name = '"created_at":"@@created_at@@" "entity_version":9223372036854775807 @@updated_at@@'
    created = store.store.create_person(fields(name=name, address='"status":"active"'), None)
    [event] = store.events()
    assert event.entity_version == 1
    assert event.data == person_data(created).model_dump(mode="json")
    assert (event.data["name"], event.data["address"]) == (name, '"status":"active"')


def test_a_registration_after_a_deletion_continues_the_versions(store: Subject):
    store.store.create_person(fields(), None)
    store.store.delete_person(CPF, None)
    created = store.store.create_person(fields(email="new@example.com"), "c-2")
    event = store.events()[-1]
    assert (event.event_type, event.entity_version, event.correlation_id) == (
        "person.created",
        3,
        "c-2",
    )
    assert event.data == person_data(created).model_dump(mode="json")


@pytest.mark.integration
@pytest.mark.parametrize("zone", ["UTC", "America/Sao_Paulo", "Asia/Kolkata"])
def test_the_registration_statement_writes_timestamps_as_python_does(person_db, zone):
    """The one-statement registration writes the row's timestamps into the event's text the way
    datetime.isoformat() writes what psycopg reads, in the session's time zone."""
    from person.store import _iso

    with psycopg.connect(person_db) as conn:
        conn.execute(f"SET TimeZone = '{zone}'")
        for literal in ("2026-01-01 10:00:00+00", "2026-07-01 10:00:00.1234+00"):
            at, text = conn.execute(
                f"SELECT t, {_iso('t')} FROM (SELECT %s::timestamptz AS t) AS x", (literal,)
            ).fetchone()
            assert text == at.isoformat()
