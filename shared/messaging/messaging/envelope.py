"""The event envelope (docs/events.md) and its strict codec."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1
_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")


class DecodeError(ValueError):
    """A message body that is not a valid envelope; never worth retrying."""


class Envelope(BaseModel):
    """One committed change of one entity, as it travels between services."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    event_id: uuid.UUID
    event_type: StrictStr = Field(pattern=_EVENT_TYPE.pattern, max_length=100)
    entity: StrictStr = Field(min_length=1, max_length=50)
    entity_id: StrictStr = Field(min_length=1, max_length=200)
    entity_version: StrictInt = Field(ge=1, le=2**63 - 1)
    occurred_at: AwareDatetime
    producer: StrictStr = Field(min_length=1, max_length=100)
    # StrictInt, not Literal[1]: a Literal compares by equality and would let true or 1.0 in.
    schema_version: StrictInt = Field(ge=SCHEMA_VERSION, le=SCHEMA_VERSION)
    correlation_id: StrictStr | None = Field(max_length=200)
    data: dict[str, Any] | None

    @field_validator("correlation_id")
    @classmethod
    def _travels(cls, value: str | None) -> str | None:
        # It becomes the message's correlation-id property, an AMQP short string: at most 255
        # bytes. One that cannot travel would be refused at publish time, far from its cause.
        if value is not None and (
            len(value.encode(errors="replace")) > 255 or not value.isprintable()
        ):
            raise ValueError("correlation_id must be printable and at most 255 bytes in UTF-8")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Envelope:
        entity, _, change = self.event_type.partition(".")
        if entity != self.entity:
            raise ValueError(f"event_type {self.event_type!r} is not about {self.entity!r}")
        if (change == "deleted") != (self.data is None):
            raise ValueError("data must be null exactly when the change is a deletion")
        return self

    @property
    def change(self) -> str:
        """Return the part of event_type after the dot (created, updated, ...)."""
        return self.event_type.partition(".")[2]

    @classmethod
    def new(
        cls,
        *,
        event_type: str,
        entity_id: str,
        entity_version: int,
        data: dict[str, Any] | None,
        producer: str,
        correlation_id: str | None = None,
        occurred_at: datetime | None = None,
        event_id: uuid.UUID | None = None,
    ) -> Envelope:
        """Build an envelope for an event of a type the producer's catalogue names (its entity is
        the part before the dot), filling in the id and the time."""
        return cls(
            event_id=event_id or uuid.uuid4(),
            event_type=str(event_type),
            entity=str(event_type).partition(".")[0],
            entity_id=str(entity_id),
            entity_version=entity_version,
            occurred_at=occurred_at or datetime.now(UTC),
            producer=producer,
            schema_version=SCHEMA_VERSION,
            correlation_id=correlation_id,
            data=data,
        )

    def to_json(self) -> bytes:
        """Encode as the UTF-8 JSON body that goes on the wire."""
        return self.model_dump_json().encode()


# The largest body worth decoding. An entity's full state is a few KiB (a producer's API takes at
# most 64 KiB per request); anything near this size is a producer's bug or an attack, not data.
MAX_BODY_BYTES = 256 * 1024


def decode(body: bytes | str) -> Envelope:
    """Decode a message body, raising DecodeError for anything that is not an envelope."""
    if len(body) > MAX_BODY_BYTES:
        raise DecodeError(f"body of {len(body)} bytes is over the {MAX_BODY_BYTES}-byte limit")
    try:
        # JSON mode: strings are accepted for UUIDs and datetimes, nothing else is coerced.
        return Envelope.model_validate_json(body)
    except ValidationError as exc:
        raise DecodeError(summarise(exc)) from None
    except (TypeError, ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"undecodable body: {exc}") from None


def summarise(exc: ValidationError) -> str:
    """A validation error as one line: each field and what is wrong with it (at most five)."""
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
