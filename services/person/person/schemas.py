"""Request validation and response shapes (pydantic); the OpenAPI document is built from them."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    RootModel,
    StringConstraints,
)
from pydantic.json_schema import SkipJsonSchema
from servicekit.web import IsoDateTime

_CPF_NOISE = re.compile(r"[.\-\s]")
_CPF = re.compile(r"^[0-9]{1,14}$")


def normalise_cpf(value: Any) -> str:
    """Turn 11111, "11111" or "111.111.111-11" into digits; ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be a number or a string of digits")
    if isinstance(value, int) and value < 0:
        raise ValueError("must not be negative")
    text = _CPF_NOISE.sub("", str(value))
    if not _CPF.fullmatch(text):
        raise ValueError("must contain 1 to 14 digits (dots, dashes and spaces are ignored)")
    return text


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, float):
        raise ValueError("must be an exact decimal")  # floats never reach here from JSON
    if isinstance(value, str) and "_" in value:
        raise ValueError("must be a plain decimal number")
    return value


def _unsigned_zero(value: Decimal) -> Decimal:
    return value.copy_abs() if value.is_zero() else value


def _storable(value: str) -> str:
    """Refuse what PostgreSQL text cannot hold: NUL characters and lone surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


def _past_date(value: Any) -> Any:
    """Accept an ISO date, or an ISO date-time (its own calendar date is kept)."""
    if not isinstance(value, str | date):
        raise ValueError("must be an ISO 8601 date string")
    if isinstance(value, str) and "T" in value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).date()
        except ValueError:
            raise ValueError("must be an ISO 8601 date or date-time") from None
    return value


def _not_in_future(value: date) -> date:
    if value > datetime.now(UTC).date():
        raise ValueError("must not be in the future")
    if value.year < 1900:
        raise ValueError("must be after 1900")
    return value


# Documented as what it accepts (a number or a string), not as the digits it turns into.
_CPF_INPUT = Annotated[int, Field(ge=0, le=99_999_999_999_999)] | str
Cpf = Annotated[str, BeforeValidator(normalise_cpf, json_schema_input_type=_CPF_INPUT)]
Money = Annotated[
    Decimal,
    BeforeValidator(_no_bool),
    Field(ge=0, max_digits=17, decimal_places=2, allow_inf_nan=False),
    AfterValidator(_unsigned_zero),
]
Text = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(_storable),
]
Address = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=500),
    AfterValidator(_storable),
]
ItemType = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=50),
    AfterValidator(_storable),
]
BirthDate = Annotated[date, BeforeValidator(_past_date), AfterValidator(_not_in_future)]
Email = Annotated[EmailStr, Field(max_length=254)]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strict=True)


class PersonIn(_Input):
    cpf: Cpf
    name: Text
    address: Address
    date_of_birth: BirthDate
    email: Email | None = None


def _cpf_is_the_key(_value: Any) -> Any:
    raise ValueError("cannot be changed; delete the person and register again")


class PersonPatch(_Input):
    """Only the fields sent change; null is refused except for email (which removes it)."""

    # Refused with its reason rather than as an unknown field; not in the document (any value
    # is refused, so additionalProperties: false already says it).
    cpf: SkipJsonSchema[Annotated[None, BeforeValidator(_cpf_is_the_key)]] = None

    name: Text = None  # type: ignore[assignment]  # a default is not validated; null is
    address: Address = None  # type: ignore[assignment]
    date_of_birth: BirthDate = None  # type: ignore[assignment]
    email: Email | None = None


class ItemIn(_Input):
    type: ItemType
    value: Money


class DebtIn(_Input):
    type: ItemType | None = None
    value: Money


# -- responses (documentation of what the API returns) ----------------------------------------
class ItemOut(BaseModel):
    id: str
    type: str | None
    value: str = Field(description="decimal money as a string, e.g. '1000.00'")


class PersonOut(BaseModel):
    cpf: str
    name: str
    address: str
    date_of_birth: date
    email: str | None
    status: Literal["pending", "active"]
    created_at: IsoDateTime
    updated_at: IsoDateTime
    incomes: list[ItemOut]
    assets: list[ItemOut]
    debts: list[ItemOut]


class PersonCreated(PersonOut):
    message: Literal["created"]


class ItemCreated(ItemOut):
    message: Literal["created"]
    cpf: str
    kind: Literal["income", "asset", "debt"]


class Accepted(BaseModel):
    message: str


# -- bulk registration -------------------------------------------------------------------------
class BulkIn(RootModel[list[dict[str, Any]]]):
    """People to register: objects validated one by one by the importer, as POST /person does."""

    root: list[dict[str, Any]] = Field(min_length=1, max_length=100_000)


class ImportAccepted(BaseModel):
    id: str
    status: Literal["pending", "running", "done"]
    total: int


class ImportFailure(BaseModel):
    index: int = Field(description="the item's position in the payload, from 0")
    errors: dict[str, list[str]]


class ImportOut(ImportAccepted):
    processed: int
    succeeded: int
    failed: int
    failures: list[ImportFailure]
    created_at: IsoDateTime
    finished_at: IsoDateTime | None


# -- the outbox, for operators (admin) ---------------------------------------------------------
class OutboxEvent(BaseModel):
    """An event in the outbox: what was committed, and whether the relay published it."""

    id: int = Field(description="the outbox row's id: the order events were committed in")
    event_id: str
    event_type: str
    entity: str
    entity_id: str
    entity_version: int
    occurred_at: IsoDateTime
    published_at: IsoDateTime | None = Field(description="null until the relay published it")
    correlation_id: str | None = Field(description="the request that made the change")


class ParkedRow(BaseModel):
    """An outbox row the broker could not take, set aside with its reason; the rows behind it
    were published (`messaging outbox retry` sends it again)."""

    id: int
    event_id: str
    event_type: str
    entity: str
    entity_id: str
    entity_version: int
    occurred_at: IsoDateTime
    parked_at: IsoDateTime
    parked_reason: str
    superseded_by: int | None = Field(
        description="the newest version of the entity published since (its consumers hold that "
        "newer state already); null if none"
    )


class OutboxOut(BaseModel):
    backlog: int = Field(description="events waiting to be published (parked rows aside)")
    oldest_age_seconds: float = Field(description="how long the oldest of them has waited")
    published: int = Field(description="events the relay has published")
    last_published_at: IsoDateTime | None
    parked_count: int
    parked: list[ParkedRow] = Field(description="the oldest parked rows (?parked= of them)")


class HistoryOut(BaseModel):
    events: list[OutboxEvent] = Field(description="oldest first")
