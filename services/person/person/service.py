"""The person rules, once: what each write may do, and which events it emits.

Each operation runs in one unit of work (a transaction): the PostgreSQL adapter (store.py) holds
the SQL and the locks, the in-memory one (memory.py) holds dictionaries; both pass the same
contract tests (tests/test_store_contract.py). Every change and its events commit together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, Protocol

from .catalogue import (
    ITEM_KINDS,
    Event,
    EventType,
    item_created,
    item_data,
    item_deleted,
    person_data,
)
from .errors import BadToken, Conflict, NotFound, TooSoon, Unprocessable

EDITABLE = ("name", "address", "date_of_birth", "email")
# Incomes, assets and debts one person may have at most (ITEMS_PER_PERSON_MAX): each score read
# walks them all, so a person must not grow without bound.
ITEMS_PER_PERSON_MAX = 1_000
Lock = Literal["update", "key share"] | None


class UnitOfWork(Protocol):
    """One transaction's view of the person store."""

    def person(self, cpf: str, lock: Lock = None) -> dict | None: ...
    def items(self, cpf: str) -> list[dict]: ...
    def count_items(self, cpf: str) -> int: ...
    def gate(self, cpf: str, exclusive: bool) -> None: ...
    def insert_person(self, fields: dict[str, Any]) -> dict | None: ...
    def insert_people(self, people: Sequence[dict[str, Any]]) -> dict[str, dict]: ...
    def register(self, fields: dict[str, Any], correlation_id: str | None) -> dict | None: ...
    def update_person(self, cpf: str, changes: dict[str, Any]) -> dict: ...
    def delete_items(self, cpf: str) -> list[dict]: ...
    def delete_person(self, cpf: str) -> None: ...
    def insert_item(self, cpf: str, kind: str, type_: str | None, value: Decimal) -> dict: ...
    def delete_item(self, cpf: str, kind: str, item_id: str) -> bool: ...
    def seconds_since_activation_mail(self, cpf: str) -> float: ...
    def mark_activation_requested(self, cpf: str) -> None: ...
    def count_activation_request(self, key_digest: str, most: int) -> bool: ...
    def emit(self, event: Event, correlation_id: str | None) -> None: ...
    def emit_many(self, events: Sequence[Event], correlation_id: str | None) -> None: ...


class PersonService:
    """The person API's operations over a unit of work (`begin()` opens one)."""

    def __init__(
        self,
        begin: Callable[[], contextlib.AbstractContextManager[UnitOfWork]],
        begin_single: Callable[[], contextlib.AbstractContextManager[UnitOfWork]] | None = None,
        items_per_person_max: int = ITEMS_PER_PERSON_MAX,
    ):
        # `begin_single`: a unit of work for an operation that is one statement, which is then
        # its own transaction (one round trip where BEGIN, the statement and COMMIT take three).
        self.begin, self.begin_single = begin, begin_single or begin
        self.items_per_person_max = items_per_person_max

    @contextlib.contextmanager
    def _work(self) -> Iterator[UnitOfWork]:
        with self.begin() as uow:
            yield uow

    def get_person(self, cpf: str) -> dict:
        with self._work() as uow:
            return with_items(_found(uow.person(cpf), cpf), uow.items(cpf))

    def create_person(self, fields: dict[str, Any], correlation_id: str | None) -> dict:
        # The person and its person.created event together, in one statement (see register).
        with self.begin_single() as uow:
            person = uow.register(fields, correlation_id)
        if person is None:
            raise already_registered(fields["cpf"])
        return with_items(person, [])

    def register_many(
        self, people: Sequence[dict[str, Any]], correlation_id: str | None
    ) -> list[dict | Conflict]:
        """Register each person as create_person does, all in one unit of work (a batch of a
        bulk import): for each, in order, the person registered (without the item lists: a new
        registration has none) or the Conflict create_person would raise (the CPF is
        registered already, or by an earlier one of `people`)."""
        first: dict[str, int] = {}  # CPF -> the index of the one that may register it
        for index, fields in enumerate(people):
            first.setdefault(fields["cpf"], index)
        with self._work() as uow:
            # A few statements for the whole batch, not three round trips per person.
            inserted = uow.insert_people([people[index] for index in first.values()])
            uow.emit_many(
                [
                    Event(EventType.PERSON_CREATED, cpf, person_data(person))
                    for cpf, person in inserted.items()
                ],
                correlation_id,
            )
        return [
            inserted[cpf] if first[cpf] == index and cpf in inserted else already_registered(cpf)
            for index, cpf in enumerate(fields["cpf"] for fields in people)
        ]

    def update_person(self, cpf: str, changes: dict[str, Any], correlation_id: str | None) -> dict:
        with self._work() as uow:
            current = _found(uow.person(cpf, lock="update"), cpf)
            changed = {k: v for k, v in changes.items() if k in EDITABLE and current[k] != v}
            if not changed:
                return with_items(current, uow.items(cpf))
            event = EventType.PERSON_UPDATED
            if _new_address(current["email"], changed.get("email")):
                # To be confirmed again: pending, and one event that carries the new state and
                # asks for a link to the new address (links to an earlier one confirm nothing).
                changed["status"], event = "pending", EventType.PERSON_ACTIVATION_REQUESTED
                uow.mark_activation_requested(cpf)
            current = uow.update_person(cpf, changed)
            uow.emit(Event(event, cpf, person_data(current)), correlation_id)
            return with_items(current, uow.items(cpf))  # this write's state, not a later one

    def delete_person(self, cpf: str, correlation_id: str | None) -> None:
        with self._work() as uow:
            # Item writes to one person share a gate (additions then count one after the other
            # under the row lock); a deletion waits for them and they for it, through a gate
            # that queues fairly (see the PostgreSQL adapter).
            uow.gate(cpf, exclusive=True)
            _found(uow.person(cpf, lock="update"), cpf)
            for item in uow.delete_items(cpf):  # each item's deletion, before the person's
                uow.emit(Event(item_deleted(item["kind"]), str(item["id"]), None), correlation_id)
            uow.delete_person(cpf)
            uow.emit(Event(EventType.PERSON_DELETED, cpf, None), correlation_id)

    def add_item(
        self, cpf: str, kind: str, type_: str | None, value: Decimal, correlation_id: str | None
    ) -> dict:
        with self._work() as uow:
            uow.gate(cpf, exclusive=False)
            # The person's row lock, held to the commit, makes concurrent additions count one
            # after the other: none can see a count the other is about to raise past the cap.
            _found(uow.person(cpf, lock="update"), cpf)
            most = self.items_per_person_max
            if uow.count_items(cpf) >= most:
                raise Unprocessable(
                    "items",
                    f"a person has at most {most} incomes, assets and debts "
                    "(ITEMS_PER_PERSON_MAX): delete one before adding another",
                )
            item = uow.insert_item(cpf, kind, type_, value)
            uow.emit(Event(item_created(kind), str(item["id"]), item_data(item)), correlation_id)
        return item

    def delete_item(self, cpf: str, kind: str, item_id: str, correlation_id: str | None) -> None:
        with self._work() as uow:
            if not uow.delete_item(cpf, kind, item_id):
                raise NotFound(f"no {kind} {item_id} for CPF {cpf}")
            uow.emit(Event(item_deleted(kind), item_id, None), correlation_id)

    def activate(
        self, cpf: str, email: str, registered_at: datetime, correlation_id: str | None
    ) -> bool:
        """Set the person active; False if already active. The link must be for this
        registration and the person's current e-mail."""
        with self._work() as uow:
            person = _found(uow.person(cpf, lock="update"), cpf)
            if person["created_at"] != registered_at:
                raise BadToken("the link was issued for an earlier registration")
            if person["email"] is None or person["email"].lower() != email.lower():
                raise BadToken("the link was issued for another e-mail address")
            if person["status"] == "active":
                return False
            person = uow.update_person(cpf, {"status": "active"})
            uow.emit(Event(EventType.PERSON_UPDATED, cpf, person_data(person)), correlation_id)
            return True

    def request_activation(
        self,
        cpf: str,
        correlation_id: str | None,
        resend_seconds: float = 0.0,
        quota: Quota | None = None,
    ) -> dict:
        """A new activation e-mail; not before `resend_seconds` after the registration or the
        last one, nor past the caller's `quota` of the day."""
        with self._work() as uow:
            person = _found(uow.person(cpf, lock="update"), cpf)
            if person["email"] is None:
                raise Unprocessable("email", "the person has no e-mail address to send a link to")
            if person["status"] == "active":
                raise Conflict("the account is already active")
            since = uow.seconds_since_activation_mail(cpf)
            if since < resend_seconds:
                raise TooSoon(
                    f"an activation e-mail was sent {since:.0f}s ago: ask again in "
                    f"{resend_seconds - since:.0f}s",
                    resend_seconds - since,
                )
            # Counted only once nothing else refuses it (and rolled back with the work if that
            # fails): a key spends its quota on e-mails, not on refusals.
            if quota is not None and not uow.count_activation_request(quota.key, quota.per_day):
                raise TooSoon(
                    f"this API key asked for {quota.per_day} activation e-mails today "
                    "(ACTIVATION_REQUESTS_PER_KEY_PER_DAY): ask again after 00:00 UTC",
                    _until_tomorrow(),
                )
            uow.mark_activation_requested(cpf)
            uow.emit(
                Event(EventType.PERSON_ACTIVATION_REQUESTED, cpf, person_data(person)),
                correlation_id,
            )
            return person


@dataclass(frozen=True)
class Quota:
    """What one API key may still ask for: `per_day` activation e-mails each UTC day."""

    key: str  # the key's digest ("" where keys are off: every caller shares one quota)
    per_day: int


def _until_tomorrow() -> float:
    """Seconds until the next UTC day, when the quotas start again."""
    now = datetime.now(UTC)
    tomorrow = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    return (tomorrow - now).total_seconds()


def _new_address(before: str | None, after: str | None) -> bool:
    """Whether a change of e-mail is to another address (letter case aside), which the person
    must confirm again."""
    return bool(after) and (before or "").lower() != after.lower()


def already_registered(cpf: str) -> Conflict:
    return Conflict(f"a person with CPF {cpf} already exists")


def _found(person: dict | None, cpf: str) -> dict:
    if person is None:
        raise NotFound(f"no person with CPF {cpf}")
    return person


def with_items(person: dict, items: list[dict]) -> dict:
    """The person with their incomes, assets and debts, as GET /person/<cpf> shows them."""
    out = dict(person)
    for kind in ITEM_KINDS:
        out[f"{kind}s"] = [
            {"id": str(i["id"]), "type": i["type"], "value": str(i["value"])}
            for i in items
            if i["kind"] == kind
        ]
    return out


Store = PersonService  # what the API needs: PgStore and memory.MemoryStore both are one
