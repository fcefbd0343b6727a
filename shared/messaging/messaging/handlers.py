"""What a consumer handles, declared once: each event type with its payload model and function.

    handlers = Handlers()

    @handlers.on("order.created", "order.updated", data=OrderFields)
    def order_changed(event: Envelope, order: OrderFields) -> OrderChange: ...

    @handlers.on("order.deleted")
    def order_deleted(event: Envelope, _: None) -> OrderChange: ...

The consumer runtime derives everything from this table: the event types it lets through (any
other is acknowledged and counted as `ignored`), the validation of each event's `data` against
the declared model (a payload that does not fit is the event's fault: it is dead-lettered at
once, with the reasons), and the dispatch. A function *translates* an event into a change of the
model; the consumer's `apply` writes a batch of changes in one step of the store (a Redis
pipeline, one transaction). Without `apply`, the functions write themselves, one event at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .envelope import Envelope, summarise
from .errors import PermanentError

Function = Callable[[Envelope, Any], Any]


@dataclass(frozen=True)
class Handler:
    event_type: str
    data: type[BaseModel] | None  # the model `data` is validated with (None: passed as is)
    function: Function


class Handlers:
    """A consumer's table of event type → (payload model, function)."""

    def __init__(self) -> None:
        self._table: dict[str, Handler] = {}
        self._every: Handler | None = None

    @classmethod
    def every(cls, function: Callable[[Envelope], Any]) -> Handlers:
        """One function for every event type, given the envelope alone (a catch-all)."""
        handlers = cls()
        handlers._every = Handler("*", None, lambda event, _data: function(event))
        return handlers

    def on(
        self, *event_types: str, data: type[BaseModel] | None = None
    ) -> Callable[[Function], Function]:
        """Declare `function(event, data)` for these event types, `data` validated as `data`."""

        def register(function: Function) -> Function:
            self.add(event_types, function, data)
            return function

        return register

    def add(
        self, event_types: Iterable[str], function: Function, data: type[BaseModel] | None = None
    ) -> None:
        for event_type in event_types:
            if event_type in self._table:
                raise ValueError(f"{event_type} is declared twice")
            self._table[event_type] = Handler(event_type, data, function)

    @property
    def event_types(self) -> frozenset[str] | None:
        """The event types declared (None: every type)."""
        return None if self._every is not None else frozenset(self._table)

    def handles(self, event_type: str) -> bool:
        return self._every is not None or event_type in self._table

    def translate(self, event: Envelope) -> Any:
        """The change an event asks for: its data validated against the declared model (a
        PermanentError with the reasons if it does not fit), then the declared function."""
        handler = self._every or self._table[event.event_type]
        data: Any = event.data
        if handler.data is not None:
            try:
                data = handler.data.model_validate(event.data)
            except ValidationError as exc:
                raise PermanentError(f"{event.event_type} data: {summarise(exc)}") from None
        return handler.function(event, data)
