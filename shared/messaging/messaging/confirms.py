"""Publisher confirms with a window: what was published and awaits the broker's ack or nack.

The relay and the confirmed publisher both keep many messages unconfirmed at a time; the broker
confirms by delivery tag, one at a time or `multiple` (every tag up to this one). This is that
bookkeeping, once.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pika.spec import Basic

T = TypeVar("T")


class ConfirmWindow(Generic[T]):
    """Unconfirmed messages by delivery tag, in publish order (tags count from 1 per channel)."""

    def __init__(self) -> None:
        self._pending: dict[int, T] = {}
        self._next_tag = 1

    def __len__(self) -> int:
        return len(self._pending)

    def published(self, item: T) -> int:
        """Record the message just published on the channel; return its delivery tag."""
        tag = self._next_tag
        self._next_tag += 1
        self._pending[tag] = item
        return tag

    def confirmed(self, method: Any) -> tuple[bool, list[T]]:
        """Settle a Basic.Ack or Basic.Nack: (acked, the items it confirms, in order)."""
        if method.multiple:  # every pending tag up to this one (the dict is in tag order)
            tags = [tag for tag in self._pending if tag <= method.delivery_tag]
        else:
            tags = [method.delivery_tag] if method.delivery_tag in self._pending else []
        return isinstance(method, Basic.Ack), [self._pending.pop(tag) for tag in tags]
