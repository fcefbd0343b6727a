"""An AsyncAPI 3 document of what a producer publishes, generated from its event catalogue.

The producer hands over its event types, each with the pydantic model of its `data` (None for
a deletion's null) and an example made by its own code; this module knows the envelope, the
exchange and RabbitMQ's bindings, and no service.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .envelope import SCHEMA_VERSION, Envelope

_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Published:
    """One event type of the catalogue."""

    event_type: str
    summary: str
    data: type[BaseModel] | None
    example: Envelope


def _key(event_type: str) -> str:
    """A component key: thing.size_changed → thingSizeChanged."""
    words = re.split(r"[._]", event_type)
    return words[0] + "".join(w.capitalize() for w in words[1:])


def _envelope_schema(event_type: str, data: type[BaseModel] | None) -> dict[str, Any]:
    entity = event_type.partition(".")[0]
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "event_id",
            "event_type",
            "entity",
            "entity_id",
            "entity_version",
            "occurred_at",
            "producer",
            "schema_version",
            "correlation_id",
            "data",
        ],
        "properties": {
            "event_id": {"type": "string", "format": "uuid"},
            "event_type": {"type": "string", "const": event_type},
            "entity": {"type": "string", "const": entity},
            "entity_id": {"type": "string", "minLength": 1, "maxLength": 200},
            "entity_version": {
                "type": "integer",
                "minimum": 1,
                "description": "grows by one with every change of the entity; consumers apply "
                "only a version newer than the one they hold",
            },
            "occurred_at": {"type": "string", "format": "date-time"},
            "producer": {"type": "string"},
            "schema_version": {"type": "integer", "const": SCHEMA_VERSION},
            "correlation_id": {"type": ["string", "null"], "maxLength": 200},
            "data": {"type": "null"}
            if data is None
            else {"$ref": _REF.format(model=data.__name__)},
        },
    }


def document(
    *,
    title: str,
    version: str,
    description: str,
    exchange: str,
    events: Sequence[Published],
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document: one fanout exchange, one message per event type."""
    models = sorted({e.data for e in events if e.data is not None}, key=lambda m: m.__name__)
    _, defs = models_json_schema([(m, "serialization") for m in models], ref_template=_REF)
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    messages: dict[str, Any] = {}
    for event in events:
        key = _key(event.event_type)
        schemas[f"{key}Envelope"] = _envelope_schema(event.event_type, event.data)
        messages[key] = {
            "name": event.event_type,
            "title": event.event_type,
            "summary": event.summary,
            "contentType": "application/json",
            "payload": {"$ref": _REF.format(model=f"{key}Envelope")},
            "bindings": {"amqp": {"messageType": event.event_type, "bindingVersion": "0.3.0"}},
            "examples": [
                {"name": event.event_type, "payload": event.example.model_dump(mode="json")}
            ],
        }
    channel_messages = {key: {"$ref": f"#/components/messages/{key}"} for key in messages}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": title, "version": version, "description": description},
        "defaultContentType": "application/json",
        "channels": {
            "events": {
                "address": exchange,
                "description": "A durable fanout exchange: every subscriber's queue gets every "
                "event. AMQP properties: message_id = event_id, type = event_type, content_type "
                "= application/json, persistent.",
                "messages": channel_messages,
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": {
                            "name": exchange,
                            "type": "fanout",
                            "durable": True,
                            "autoDelete": False,
                            "vhost": "/",
                        },
                        "bindingVersion": "0.3.0",
                    }
                },
            }
        },
        "operations": {
            "publishEvents": {
                "action": "send",
                "summary": "Every committed change, through the transactional outbox",
                "channel": {"$ref": "#/channels/events"},
                "messages": [{"$ref": f"#/channels/events/messages/{key}"} for key in messages],
                "bindings": {
                    "amqp": {"deliveryMode": 2, "mandatory": True, "bindingVersion": "0.3.0"}
                },
            }
        },
        "components": {"schemas": schemas, "messages": messages},
    }
