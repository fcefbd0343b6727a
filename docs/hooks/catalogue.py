"""MkDocs hook: the events page's catalogue, rendered from what the producer publishes.

`<!-- events-catalogue -->` in a page becomes a table of every event type (when it is published
and what its `data` holds) and an example of each, all read from the AsyncAPI document the person
service serves at /asyncapi.json (person.catalogue.document), so the page cannot drift from the
contract. tests/test_catalogue.py checks that the page uses it.
"""

from __future__ import annotations

import html
import json
from typing import Any

MARKER = "<!-- events-catalogue -->"


def _schema(document: dict[str, Any], ref: str) -> dict[str, Any]:
    return document["components"]["schemas"][ref.rpartition("/")[2]]


def _data(document: dict[str, Any], envelope: dict[str, Any]) -> str:
    """What an event's `data` holds, from its schema: `null`, or the model and its fields."""
    data = envelope["properties"]["data"]
    if "$ref" not in data:
        return "`null`"
    schema = _schema(document, data["$ref"])
    return f"{schema.get('description', schema['title'])} " + ", ".join(
        _field(name, spec) for name, spec in schema["properties"].items()
    )


def _field(name: str, spec: dict[str, Any]) -> str:
    notes = [spec["description"]] if "description" in spec else []
    if "enum" in spec:
        notes.append(" or ".join(f"`{value}`" for value in spec["enum"]))
    return f"`{name}` ({'; '.join(notes)})" if notes else f"`{name}`"


def render(document: dict[str, Any]) -> str:
    """The catalogue of an AsyncAPI document as Markdown: a table, then one example per type."""
    messages = document["components"]["messages"]
    rows = ["| event type | when | `data` |", "|---|---|---|"]
    examples = []
    for message in messages.values():
        envelope = _schema(document, message["payload"]["$ref"])
        when = html.escape(message["summary"]).replace("|", "\\|")
        rows.append(f"| `{message['name']}` | {when} | {_data(document, envelope)} |")
        example = json.dumps(message["examples"][0]["payload"], indent=1, ensure_ascii=False)
        examples.append(f'??? example "`{message["name"]}`"\n\n    ```json\n')
        examples[-1] += "".join(f"    {line}\n" for line in example.splitlines()) + "    ```\n"
    return (
        "\n".join(rows)
        + "\n\nAn example of each, as the producer's own code makes it:\n\n"
        + ("\n".join(examples))
    )


def published() -> dict[str, Any]:
    """The person service's AsyncAPI document, on its default exchange."""
    from person.catalogue import document
    from person.config import PersonConfig

    return document(PersonConfig.model_fields["events_exchange"].default)


def on_page_markdown(markdown: str, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render(published()))
