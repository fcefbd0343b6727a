"""Unit: the event envelope decodes strictly; anything else is one typed DecodeError."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from messaging import DecodeError, Envelope, decode

pytestmark = pytest.mark.unit

REQUIRED_FIELDS = (
    "event_id",
    "event_type",
    "entity",
    "entity_id",
    "entity_version",
    "occurred_at",
    "producer",
    "schema_version",
    "data",
)


def valid_fields(**overrides: Any) -> dict[str, Any]:
    """The JSON fields of a valid `thing.updated` envelope, with some replaced."""
    fields = json.loads(
        Envelope.new(
            event_type="thing.updated",
            entity_id="t-1",
            entity_version=3,
            data={"name": "a thing", "amount": "12.50"},
            producer="test",
            correlation_id="req-1",
        ).to_json()
    )
    fields.update(overrides)
    return fields


def body(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields).encode()


def without(name: str) -> bytes:
    fields = valid_fields()
    del fields[name]
    return body(fields)


def test_a_valid_envelope_survives_encoding_and_decoding_unchanged():
    sent = Envelope.new(
        event_type="thing.updated",
        entity_id="t-1",
        entity_version=7,
        data={"name": "a thing", "nested": {"list": [1, 2, 3]}, "amount": "12.50"},
        producer="test",
        correlation_id="req-1",
        occurred_at=datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
        event_id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
    )

    received = decode(sent.to_json())

    assert received == sent
    assert received.event_type == "thing.updated"
    assert received.change == "updated"
    assert received.to_json() == sent.to_json()


def test_a_deletion_with_null_data_survives_encoding_and_decoding():
    sent = Envelope.new(
        event_type="thing.deleted", entity_id="t-1", entity_version=9, data=None, producer="t"
    )

    assert decode(sent.to_json()) == sent


def test_a_body_given_as_text_decodes_like_the_same_bytes():
    sent = Envelope.new(
        event_type="thing.created", entity_id="t-1", entity_version=1, data={}, producer="t"
    )

    assert decode(sent.to_json().decode()) == sent


def test_an_activation_request_event_type_is_accepted():
    fields = valid_fields(entity="person", event_type="person.activation_requested")

    assert decode(body(fields)).change == "activation_requested"


BAD_BODIES = [
    pytest.param(b"not json", id="not-json"),
    pytest.param(b"", id="empty-body"),
    pytest.param(b"\xff\xfe\x00\x81garbage", id="not-utf8"),
    pytest.param(
        body(valid_fields()).replace(b'"t-1"', b'"t-\xff"'), id="not-utf8-inside-a-string"
    ),
    pytest.param(b"[]", id="json-array"),
    pytest.param(json.dumps([valid_fields()]).encode(), id="envelope-wrapped-in-array"),
    pytest.param(b'"a string"', id="json-string"),
    pytest.param(b"null", id="json-null"),
    pytest.param(b"42", id="json-number"),
    pytest.param(body(valid_fields()) + b" trailing", id="trailing-garbage"),
    *[pytest.param(without(name), id=f"missing-{name}") for name in REQUIRED_FIELDS],
    pytest.param(body(valid_fields(schema_version=2)), id="schema-version-2"),
    pytest.param(body(valid_fields(schema_version="1")), id="schema-version-as-string"),
    pytest.param(body(valid_fields(schema_version=True)), id="schema-version-as-bool"),
    pytest.param(body(valid_fields(schema_version=1.0)), id="schema-version-as-float"),
    pytest.param(body(valid_fields(entity_version="1")), id="version-as-string"),
    pytest.param(body(valid_fields(entity_version=1.5)), id="version-as-float"),
    pytest.param(body(valid_fields(entity_version=1.0)), id="version-as-whole-float"),
    pytest.param(body(valid_fields(entity_version=True)), id="version-as-bool"),
    pytest.param(body(valid_fields(entity_version=None)), id="version-null"),
    pytest.param(body(valid_fields(entity_version=0)), id="version-zero"),
    pytest.param(body(valid_fields(entity_version=-1)), id="version-negative"),
    pytest.param(body(valid_fields(event_id="not-a-uuid")), id="event-id-not-a-uuid"),
    pytest.param(body(valid_fields(event_id=12345)), id="event-id-as-number"),
    pytest.param(body(valid_fields(occurred_at="2024-05-01T12:30:00")), id="naive-datetime"),
    pytest.param(body(valid_fields(occurred_at="2024-05-01")), id="date-without-time"),
    pytest.param(body(valid_fields(occurred_at=1714566600)), id="datetime-as-number"),
    pytest.param(body(valid_fields(occurred_at="yesterday")), id="datetime-not-a-date"),
    pytest.param(body(valid_fields(event_type="other.updated")), id="event-type-other-entity"),
    pytest.param(body(valid_fields(event_type="thing")), id="event-type-without-change"),
    pytest.param(
        body(valid_fields(event_type="Thing.updated", entity="Thing")), id="event-type-uppercase"
    ),
    pytest.param(body(valid_fields(entity_id=17)), id="entity-id-as-number"),
    pytest.param(body(valid_fields(entity_id="")), id="entity-id-empty"),
    pytest.param(body(valid_fields(producer="")), id="producer-empty"),
    pytest.param(body(valid_fields(correlation_id=5)), id="correlation-id-as-number"),
    pytest.param(body(valid_fields(data=None)), id="null-data-on-an-update"),
    pytest.param(
        body(valid_fields(event_type="thing.created", data=None)), id="null-data-on-a-create"
    ),
    pytest.param(
        body(valid_fields(event_type="thing.deleted", data={"name": "x"})),
        id="data-present-on-a-delete",
    ),
    pytest.param(body(valid_fields(data=[1, 2])), id="data-as-array"),
    pytest.param(body(valid_fields(data="state")), id="data-as-string"),
    pytest.param(body(valid_fields(unexpected="field")), id="extra-unknown-field"),
    pytest.param(b"\x00garbage\xfe" * 100_000, id="1MB-of-binary-garbage"),
    pytest.param(b"[" * 1_000_000, id="1MB-of-nesting"),
    pytest.param(b'{"event_id": "' + b"a" * 1_000_000 + b'"}', id="1MB-string-field"),
]


@pytest.mark.parametrize("raw", BAD_BODIES)
def test_every_kind_of_bad_body_raises_the_one_decode_error(raw: bytes):
    with pytest.raises(DecodeError):
        decode(raw)


def test_the_decode_error_says_which_field_is_wrong():
    with pytest.raises(DecodeError, match="entity_version"):
        decode(body(valid_fields(entity_version="1")))


def test_the_decode_error_is_a_value_error_and_hides_the_validation_traceback():
    with pytest.raises(DecodeError) as caught:
        decode(b"not json")

    assert isinstance(caught.value, ValueError)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_a_valid_envelope_over_the_size_limit_is_refused_and_says_so():
    from messaging.envelope import MAX_BODY_BYTES

    padding = "x" * MAX_BODY_BYTES
    oversized = body(valid_fields(data={"name": padding}))
    with pytest.raises(DecodeError, match=r"over the \d+-byte limit"):
        decode(oversized)
    just_under = body(valid_fields(data={"name": padding[: MAX_BODY_BYTES - 1024]}))
    assert decode(just_under).data["name"].startswith("xxx")
