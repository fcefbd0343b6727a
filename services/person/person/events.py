"""Entity state as it travels in events: JSON-ready, money as decimal strings."""

from __future__ import annotations

from typing import Any

PRODUCER = "person"


def person_state(row: dict[str, Any]) -> dict[str, Any]:
    """The full state of a person (without items, which are entities of their own)."""
    return {
        "cpf": row["cpf"],
        "name": row["name"],
        "address": row["address"],
        "date_of_birth": row["date_of_birth"].isoformat(),
        "email": row["email"],
        "status": row["status"],
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
    }


def item_state(row: dict[str, Any]) -> dict[str, Any]:
    """The full state of an income, asset or debt."""
    return {
        "id": str(row["id"]),
        "cpf": row["cpf"],
        "kind": row["kind"],
        "type": row["type"],
        "value": str(row["value"]),
    }
