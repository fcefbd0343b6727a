"""An in-memory person store for unit tests: the person rules (service.py) over dictionaries.

It passes the same contract tests as the PostgreSQL store (tests/test_store_contract.py).
"""

from __future__ import annotations

import contextlib
import copy
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from messaging import Envelope

from .catalogue import PRODUCER, Event, EventType, person_data
from .service import ITEMS_PER_PERSON_MAX, Lock, PersonService

# What a unit of work may change: put back whole if it raises.
_STATE = ("people", "items", "events", "activation_requested_at", "activation_quota", "versions")


class MemoryStore(PersonService):
    """People, items and the events they produced, in dictionaries behind one lock."""

    def __init__(
        self,
        new_id: Callable[[], uuid.UUID] = uuid.uuid4,
        items_per_person_max: int = ITEMS_PER_PERSON_MAX,
    ) -> None:
        self.new_id = new_id  # item ids (a test can make them reproducible)
        self.people: dict[str, dict] = {}
        self.items: dict[str, dict] = {}
        self.events: list[Envelope] = []
        self.activation_requested_at: dict[str, datetime] = {}
        self.activation_quota: dict[tuple[str, date], int] = {}  # (key, UTC day) -> requests
        self.versions: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        super().__init__(self._transaction, items_per_person_max=items_per_person_max)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[MemoryUnitOfWork]:
        """All of it or nothing: the dictionaries are put back if the work raises."""
        with self._lock:
            saved = copy.deepcopy({name: getattr(self, name) for name in _STATE})
            try:
                yield MemoryUnitOfWork(self)
            except BaseException:
                for name, value in saved.items():
                    setattr(self, name, value)
                raise

    def ping(self) -> None:
        pass

    def outbox_backlog(self) -> tuple[int, float, int]:
        return 0, 0.0, 0

    def outbox_published(self) -> tuple[int, float | None]:
        return 0, None

    def outbox_status(self, parked_limit: int) -> dict[str, Any]:
        return {
            "backlog": 0,
            "oldest_age_seconds": 0.0,
            "published": 0,
            "last_published_at": None,
            "parked_count": 0,
            "parked": [],
        }

    def outbox_history(
        self, cpf: str | None, correlation_id: str | None, limit: int
    ) -> list[dict[str, Any]]:
        with self._lock:
            events = list(enumerate(self.events, start=1))
        found = [
            {
                "id": row,
                "event_id": str(e.event_id),
                "event_type": e.event_type,
                "entity": e.entity,
                "entity_id": e.entity_id,
                "entity_version": e.entity_version,
                "occurred_at": e.occurred_at,
                "published_at": None,
                "correlation_id": e.correlation_id,
            }
            for row, e in events
            if (cpf and (e.entity_id == cpf or (e.data or {}).get("cpf") == cpf))
            or (correlation_id and e.correlation_id == correlation_id)
        ]
        return found[:limit]


class MemoryUnitOfWork:
    """service.UnitOfWork over the store's dictionaries (the store's lock is held)."""

    def __init__(self, store: MemoryStore) -> None:
        self.s = store

    def person(self, cpf: str, lock: Lock = None) -> dict | None:
        found = self.s.people.get(cpf)
        return copy.deepcopy(found) if found else None

    def items(self, cpf: str) -> list[dict]:
        return [dict(i) for i in self.s.items.values() if i["cpf"] == cpf]

    def count_items(self, cpf: str) -> int:
        return sum(1 for i in self.s.items.values() if i["cpf"] == cpf)

    def gate(self, cpf: str, exclusive: bool) -> None:
        pass  # the store's lock serialises everything

    def insert_person(self, fields: dict[str, Any]) -> dict | None:
        if fields["cpf"] in self.s.people:
            return None
        now = datetime.now(UTC)
        person = {**fields, "status": "pending", "created_at": now, "updated_at": now}
        self.s.people[fields["cpf"]] = person
        return dict(person)

    def insert_people(self, people: Sequence[dict[str, Any]]) -> dict[str, dict]:
        inserted = (self.insert_person(fields) for fields in people)
        return {person["cpf"]: person for person in inserted if person is not None}

    def register(self, fields: dict[str, Any], correlation_id: str | None) -> dict | None:
        person = self.insert_person(fields)
        if person is not None:
            self.emit(
                Event(EventType.PERSON_CREATED, person["cpf"], person_data(person)), correlation_id
            )
        return person

    def update_person(self, cpf: str, changes: dict[str, Any]) -> dict:
        self.s.people[cpf].update(changes, updated_at=datetime.now(UTC))
        return dict(self.s.people[cpf])

    def delete_items(self, cpf: str) -> list[dict]:
        gone = [item for item in self.s.items.values() if item["cpf"] == cpf]
        for item in gone:
            del self.s.items[str(item["id"])]
        return gone

    def delete_person(self, cpf: str) -> None:
        del self.s.people[cpf]
        self.s.activation_requested_at.pop(cpf, None)

    def insert_item(self, cpf: str, kind: str, type_: str | None, value: Decimal) -> dict:
        item = {
            "id": self.s.new_id(),
            "cpf": cpf,
            "kind": kind,
            "type": type_,
            "value": value.quantize(Decimal("0.01")),
        }
        self.s.items[str(item["id"])] = item
        return dict(item)

    def delete_item(self, cpf: str, kind: str, item_id: str) -> bool:
        item = self.s.items.get(item_id)
        if item is None or item["cpf"] != cpf or item["kind"] != kind:
            return False
        del self.s.items[item_id]
        return True

    def seconds_since_activation_mail(self, cpf: str) -> float:
        last = self.s.activation_requested_at.get(cpf, self.s.people[cpf]["created_at"])
        return (datetime.now(UTC) - last).total_seconds()

    def mark_activation_requested(self, cpf: str) -> None:
        self.s.activation_requested_at[cpf] = datetime.now(UTC)

    def count_activation_request(self, key_digest: str, most: int) -> bool:
        today = (key_digest, datetime.now(UTC).date())
        if self.s.activation_quota.get(today, 0) >= most:
            return False
        self.s.activation_quota[today] = self.s.activation_quota.get(today, 0) + 1
        return True

    def emit(self, event: Event, correlation_id: str | None) -> None:
        key = (event.type.value.partition(".")[0], event.entity_id)
        self.s.versions[key] = self.s.versions.get(key, 0) + 1
        self.s.events.append(
            Envelope.new(
                event_type=event.type,
                entity_id=event.entity_id,
                entity_version=self.s.versions[key],
                data=event.payload(),
                producer=PRODUCER,
                correlation_id=correlation_id,
            )
        )

    def emit_many(self, events: Sequence[Event], correlation_id: str | None) -> None:
        for event in events:
            self.emit(event, correlation_id)
