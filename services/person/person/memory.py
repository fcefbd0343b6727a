"""An in-memory person store for unit tests; passes the same contract tests as PgStore."""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from messaging import Envelope

from .errors import BadToken, Conflict, NotFound
from .events import PRODUCER, item_state, person_state
from .store import EDITABLE, _check_can_activate, _check_resend, _with_items


class MemoryStore:
    """People, items and the events they produced, in dictionaries behind one lock."""

    def __init__(self, new_id: Callable[[], uuid.UUID] = uuid.uuid4) -> None:
        self.new_id = new_id  # item ids (a test can make them reproducible)
        self.people: dict[str, dict] = {}
        self.items: dict[str, dict] = {}
        self.events: list[Envelope] = []
        self.activation_requested_at: dict[str, datetime] = {}
        self._versions: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def get_person(self, cpf: str) -> dict:
        with self._lock:
            person = self._person(cpf)
            items = [i for i in self.items.values() if i["cpf"] == cpf]
            return _with_items(copy.deepcopy(person), items)

    def ping(self) -> None:
        pass

    def outbox_backlog(self) -> tuple[int, float]:
        return 0, 0.0

    def outbox_published(self) -> tuple[int, float | None]:
        return 0, None

    def create_person(self, fields: dict[str, Any], correlation_id: str | None) -> dict:
        with self._lock:
            if fields["cpf"] in self.people:
                raise Conflict(f"a person with CPF {fields['cpf']} already exists")
            now = datetime.now(UTC)
            person = {**fields, "status": "pending", "created_at": now, "updated_at": now}
            self.people[fields["cpf"]] = person
            self._event("person", person["cpf"], "created", person_state(person), correlation_id)
            return _with_items(dict(person), [])

    def update_person(self, cpf: str, changes: dict[str, Any], correlation_id: str | None) -> dict:
        with self._lock:
            person = self._person(cpf)
            changed = {k: v for k, v in changes.items() if k in EDITABLE and person[k] != v}
            if changed:
                person.update(changed, updated_at=datetime.now(UTC))
                self._event("person", cpf, "updated", person_state(person), correlation_id)
        return self.get_person(cpf)

    def delete_person(self, cpf: str, correlation_id: str | None) -> None:
        with self._lock:
            self._person(cpf)
            for item_id, item in list(self.items.items()):
                if item["cpf"] == cpf:
                    del self.items[item_id]
                    self._event(item["kind"], item_id, "deleted", None, correlation_id)
            del self.people[cpf]
            self.activation_requested_at.pop(cpf, None)
            self._event("person", cpf, "deleted", None, correlation_id)

    def add_item(
        self, cpf: str, kind: str, type_: str | None, value: Decimal, correlation_id: str | None
    ) -> dict:
        with self._lock:
            self._person(cpf)
            item = {
                "id": self.new_id(),
                "cpf": cpf,
                "kind": kind,
                "type": type_,
                "value": value.quantize(Decimal("0.01")),
            }
            self.items[str(item["id"])] = item
            self._event(kind, str(item["id"]), "created", item_state(item), correlation_id)
            return dict(item)

    def delete_item(self, cpf: str, kind: str, item_id: str, correlation_id: str | None) -> None:
        with self._lock:
            item = self.items.get(item_id)
            if item is None or item["cpf"] != cpf or item["kind"] != kind:
                raise NotFound(f"no {kind} {item_id} for CPF {cpf}")
            del self.items[item_id]
            self._event(kind, item_id, "deleted", None, correlation_id)

    def activate(
        self, cpf: str, email: str, registered_at: datetime, correlation_id: str | None
    ) -> bool:
        with self._lock:
            person = self._person(cpf)
            if person["created_at"] != registered_at:
                raise BadToken("the link was issued for an earlier registration")
            if person["email"] is None or person["email"].lower() != email.lower():
                raise BadToken("the link was issued for another e-mail address")
            if person["status"] == "active":
                return False
            person.update(status="active", updated_at=datetime.now(UTC))
            self._event("person", cpf, "updated", person_state(person), correlation_id)
            return True

    def request_activation(
        self, cpf: str, correlation_id: str | None, resend_seconds: float = 0.0
    ) -> dict:
        with self._lock:
            person = self._person(cpf)
            _check_can_activate(person)
            now = datetime.now(UTC)
            last = self.activation_requested_at.get(cpf, person["created_at"])
            _check_resend((now - last).total_seconds(), resend_seconds)
            self.activation_requested_at[cpf] = now
            self._event("person", cpf, "activation_requested", person_state(person), correlation_id)
            return dict(person)

    def _person(self, cpf: str) -> dict:
        person = self.people.get(cpf)
        if person is None:
            raise NotFound(f"no person with CPF {cpf}")
        return person

    def _event(
        self,
        entity: str,
        entity_id: str,
        change: str,
        data: dict | None,
        correlation_id: str | None,
    ) -> None:
        key = (entity, entity_id)
        self._versions[key] = self._versions.get(key, 0) + 1
        self.events.append(
            Envelope.new(
                entity=entity,
                entity_id=entity_id,
                change=change,
                entity_version=self._versions[key],
                data=data,
                producer=PRODUCER,
                correlation_id=correlation_id,
            )
        )
