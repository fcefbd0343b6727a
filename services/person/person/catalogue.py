"""The person service's event catalogue: every event type it publishes, and the shape of its data.

This is the contract with every consumer, stated once. The store emits `Event`s of these types;
GET /asyncapi.json publishes the catalogue as an AsyncAPI 3 document (messaging.asyncapi), with
an example of each type made by the same code that makes the real events; the docs site's events
page renders its table from that document (docs/hooks/catalogue.py, tests/test_catalogue.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal

from messaging import Envelope, asyncapi
from pydantic import BaseModel, ConfigDict, Field

PRODUCER = "person"
# The person's items: each kind is an entity of its own in the event stream.
ITEM_KINDS = ("income", "asset", "debt")
ItemKind = Literal["income", "asset", "debt"]


class EventType(StrEnum):
    PERSON_CREATED = "person.created"
    PERSON_UPDATED = "person.updated"
    PERSON_ACTIVATION_REQUESTED = "person.activation_requested"
    PERSON_DELETED = "person.deleted"
    INCOME_CREATED = "income.created"
    INCOME_DELETED = "income.deleted"
    ASSET_CREATED = "asset.created"
    ASSET_DELETED = "asset.deleted"
    DEBT_CREATED = "debt.created"
    DEBT_DELETED = "debt.deleted"


def item_created(kind: str) -> EventType:
    return EventType(f"{kind}.created")


def item_deleted(kind: str) -> EventType:
    return EventType(f"{kind}.deleted")


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PersonData(_Data):
    """A person's full state after the change (without items: they are entities of their own)."""

    cpf: str = Field(pattern=r"^[0-9]{1,14}$")
    name: str
    address: str
    date_of_birth: str = Field(description="ISO 8601 date")
    email: str | None
    status: Literal["pending", "active"]
    created_at: str = Field(description="ISO 8601 date-time: when this registration was made")
    updated_at: str = Field(description="ISO 8601 date-time")


class ItemData(_Data):
    """An income's, asset's or debt's full state."""

    id: str
    cpf: str = Field(pattern=r"^[0-9]{1,14}$")
    kind: ItemKind
    type: str | None
    value: str = Field(
        pattern=r"^[0-9]{1,15}\.[0-9]{2}$", description="decimal money, 2 decimals: '1000.00'"
    )


@dataclass(frozen=True)
class Spec:
    data: type[_Data] | None  # None: the data is null (a deletion)
    when: str


CATALOGUE: dict[EventType, Spec] = {
    EventType.PERSON_CREATED: Spec(PersonData, "POST /person (and each person of a bulk import)"),
    EventType.PERSON_UPDATED: Spec(
        PersonData, "PATCH /person/<cpf> (the same e-mail address), activation"
    ),
    EventType.PERSON_ACTIVATION_REQUESTED: Spec(
        PersonData,
        "POST /person/<cpf>/activation, or a PATCH to a new e-mail address (the person is "
        "pending again): the notifier sends a new link to its current address",
    ),
    EventType.PERSON_DELETED: Spec(None, "DELETE /person/<cpf>, after its items' deletions"),
    **{item_created(kind): Spec(ItemData, f"POST /person/<cpf>/{kind}") for kind in ITEM_KINDS},
    **{
        item_deleted(kind): Spec(None, f"DELETE /person/<cpf>/{kind}/<id> or the person's deletion")
        for kind in ITEM_KINDS
    },
}


@dataclass(frozen=True)
class Event:
    """One event the store emits in the transaction of its change."""

    type: EventType
    entity_id: str
    data: _Data | None

    def __post_init__(self) -> None:
        expected = CATALOGUE[self.type].data
        if (self.data is None) != (expected is None) or (
            expected is not None and not isinstance(self.data, expected)
        ):
            raise TypeError(f"{self.type} carries {expected}, not {type(self.data).__name__}")

    def payload(self) -> dict[str, Any] | None:
        return None if self.data is None else self.data.model_dump(mode="json")


def person_data(row: dict[str, Any]) -> PersonData:
    """A person row as events carry it: JSON-ready, dates in ISO 8601."""
    return PersonData(
        cpf=row["cpf"],
        name=row["name"],
        address=row["address"],
        date_of_birth=row["date_of_birth"].isoformat(),
        email=row["email"],
        status=row["status"],
        created_at=row["created_at"].isoformat(),
        updated_at=row["updated_at"].isoformat(),
    )


def item_data(row: dict[str, Any]) -> ItemData:
    """An item row as events carry it: money as a decimal string with 2 decimals."""
    return ItemData(
        id=str(row["id"]),
        cpf=row["cpf"],
        kind=row["kind"],
        type=row["type"],
        value=f"{Decimal(row['value']).quantize(Decimal('0.01'))}",
    )


# What the examples of the published contract are made from: rows as the store holds them,
# turned into data by the same functions the store's events use.
_AT = datetime(2026, 11, 23, 10, 59, 35, 869687, tzinfo=UTC)
EXAMPLE_PERSON = {
    "cpf": "12345678909",
    "name": "Maria Silva",
    "address": "Rua das Flores, 10, Recife",
    "date_of_birth": date(1990, 4, 12),
    "email": "maria@example.com",
    "status": "pending",
    "created_at": _AT,
    "updated_at": _AT,
}


def example(event_type: EventType) -> tuple[str, dict[str, Any] | None]:
    """(entity id, data) of an example event of this type, made as the store makes them."""
    entity = event_type.value.partition(".")[0]
    if entity == "person":
        if event_type is EventType.PERSON_DELETED:
            return EXAMPLE_PERSON["cpf"], None
        return EXAMPLE_PERSON["cpf"], person_data(EXAMPLE_PERSON).model_dump(mode="json")
    item_id = "7a56e467-afa8-43ea-9ab8-fb97bdec914a"
    if event_type.value.endswith(".deleted"):
        return item_id, None
    row = {
        "id": item_id,
        "cpf": "12345678909",
        "kind": entity,
        "type": "renting",
        "value": Decimal("1000"),
    }
    return item_id, item_data(row).model_dump(mode="json")


def example_envelope(event_type: EventType) -> Envelope:
    """The published example of an event type: reproducible ids and times, the real data."""
    entity_id, data = example(event_type)
    version = {"created": 1, "deleted": 3}.get(event_type.value.partition(".")[2], 2)
    return Envelope.new(
        event_type=event_type,
        entity_id=entity_id,
        entity_version=version,
        data=data,
        producer=PRODUCER,
        correlation_id="b5e35b9b-5add-42a1-9c0e-17f5191c053c",
        occurred_at=_AT,
        event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"example:{event_type.value}"),
    )


def document(exchange: str) -> dict[str, Any]:
    """The catalogue as an AsyncAPI 3 document (GET /asyncapi.json)."""
    return asyncapi.document(
        title="person events",
        version="1.0.0",
        description="Every change the person service commits, published through its "
        "transactional outbox. `data` is the entity's full state after the change, null on a "
        "deletion; apply an event only if its entity_version is newer than the one you hold.",
        exchange=exchange,
        events=[
            asyncapi.Published(event_type.value, spec.when, spec.data, example_envelope(event_type))
            for event_type, spec in CATALOGUE.items()
        ],
    )
