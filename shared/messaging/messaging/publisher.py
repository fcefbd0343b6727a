"""Publish a stream of messages with pipelined publisher confirms, for one-shot tools.

A blocking channel in confirm mode waits for each message's confirm before sending the next:
one round trip per message. Here up to `window` messages are unconfirmed at a time, so the
broker's confirms (often one `multiple` ack for many) flow while more messages go out. The
call returns only when every message was confirmed. It raises PublishError if any was nacked
or returned as unroutable, if the connection or channel closed with messages unconfirmed, if
reading the messages failed, or if the broker confirmed nothing for `stall_timeout` seconds
while messages were waiting (a queue without a quorum holds its confirms back). The caller then
publishes again: consumers apply by version, so what did arrive is harmless.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pika
from pika import SelectConnection

from .confirms import ConfirmWindow
from .connection import amqp_parameters, rotated


def event_properties(
    event_id: str,
    event_type: str,
    correlation_id: str | None,
    headers: dict[str, Any] | None = None,
) -> pika.BasicProperties:
    """The AMQP properties of an event (docs/events.md): its id, its type, JSON, persistent."""
    return pika.BasicProperties(
        message_id=event_id,
        type=event_type,
        correlation_id=correlation_id,
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        headers=headers,
    )


# A message's properties travel in one frame, which must fit the connection's frame size (128 KiB
# by default): far more than an event's properties, whose largest field is a 255-byte string.
MAX_PROPERTIES_BYTES = 64 * 1024


def unpublishable(body: bytes, properties: pika.BasicProperties, max_body: int) -> str | None:
    """Why the broker could not take this message as it is, or None if it can.

    Properties that cannot be encoded as AMQP (a short string over 255 bytes, a header value of
    a type AMQP lacks) make pika raise inside basic_publish; a body past `max_body` would be
    refused by every consumer. Neither is worth publishing again unchanged.
    """
    if len(body) > max_body:
        return f"the body is {len(body)} bytes, over the {max_body}-byte limit"
    try:
        size = sum(len(chunk) for chunk in properties.encode())
    except Exception as exc:
        return f"its AMQP properties cannot be encoded ({type(exc).__name__}: {exc})"[:500]
    if size > MAX_PROPERTIES_BYTES:
        return f"its AMQP properties take {size} bytes, over {MAX_PROPERTIES_BYTES}"
    return None


class PublishError(RuntimeError):
    """Not every message was confirmed; `confirmed` of them were before the run failed."""

    def __init__(self, why: str, confirmed: int) -> None:
        super().__init__(f"{why} ({confirmed} message(s) confirmed before)")
        self.confirmed = confirmed


@dataclass(frozen=True)
class Outgoing:
    routing_key: str
    body: bytes
    properties: pika.BasicProperties


@dataclass(frozen=True)
class Published:
    confirmed: int
    seconds: float  # from the first publish to the last confirm


class ConfirmedPublisher:
    """Publishes every message of an iterable to one exchange; see the module docstring."""

    def __init__(self, amqp_url: str, exchange: str, client_name: str, window: int = 1000) -> None:
        self.nodes = amqp_parameters(amqp_url, client_name)
        self.exchange, self.window = exchange, window

    def publish_all(
        self,
        messages: Iterable[Outgoing],
        timeout: float | None = None,
        stall_timeout: float = 60.0,
    ) -> Published:
        """Publish every message; `timeout` bounds the whole run, `stall_timeout` the wait for
        the next confirm."""
        messages = iter(messages)
        nodes = list(rotated(self.nodes))
        for index, params in enumerate(nodes):
            run = _Run(self, params, messages, stall_timeout)
            try:
                return run.start(timeout)
            except PublishError:
                # A node that could not be reached (refused, its name unresolvable) published
                # nothing: try the next one.
                if not run.unreachable or index == len(nodes) - 1:
                    raise
        raise AssertionError("unreachable")


class _Run:
    def __init__(
        self,
        owner: ConfirmedPublisher,
        params: pika.URLParameters,
        messages: Iterator[Outgoing],
        stall_timeout: float,
    ) -> None:
        self.owner, self.messages, self.stall_timeout = owner, messages, stall_timeout
        self.unreachable = False
        self.progress_at = time.monotonic()
        self.exhausted = False
        self.sent = self.confirmed = 0
        self.pending: ConfirmWindow[None] = ConfirmWindow()
        self.problem: str | None = None
        self.started = self.finished = 0.0
        self.channel: Any = None
        self.conn = SelectConnection(
            params,
            on_open_callback=lambda conn: conn.channel(on_open_callback=self._on_channel),
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )

    def start(self, timeout: float | None) -> Published:
        if timeout is not None:
            self.conn.ioloop.call_later(timeout, lambda: self._fail(f"timed out after {timeout}s"))
        self.conn.ioloop.call_later(1.0, self._watch)
        self.conn.ioloop.start()
        if self.problem is None and not self._done():
            self.problem = "the connection closed"
        if self.problem is not None:
            raise PublishError(self.problem, self.confirmed)
        return Published(self.confirmed, max(0.0, self.finished - self.started))

    def _on_open_error(self, _conn: Any, exc: BaseException) -> None:
        self.unreachable = True
        self._fail(f"could not connect: {exc}")

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_return_callback(self._on_return)
        channel.add_on_close_callback(self._on_channel_closed)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._begin)

    def _begin(self, _frame: Any) -> None:
        self.started = time.perf_counter()
        self.progress_at = time.monotonic()
        self._top_up()

    def _watch(self) -> None:
        """Every second: fail if messages have waited stall_timeout for a confirm."""
        if self.problem is not None or self._done():
            return
        if self.pending and time.monotonic() - self.progress_at > self.stall_timeout:
            self._fail(f"no confirm from the broker for {self.stall_timeout:.0f}s")
            return
        self.conn.ioloop.call_later(1.0, self._watch)

    def _top_up(self) -> None:
        """Publish until the window is full or the messages run out; close once all confirmed."""
        while not self.exhausted and len(self.pending) < self.owner.window:
            try:
                message = next(self.messages, None)
                if message is None:
                    self.exhausted = True
                    break
                self.channel.basic_publish(
                    exchange=self.owner.exchange,
                    routing_key=message.routing_key,
                    body=message.body,
                    properties=message.properties,
                    mandatory=True,
                )
            except Exception as exc:  # reading the messages failed (a database error, say)
                self._fail(f"{type(exc).__name__}: {exc}")
                return
            self.sent += 1
            self.pending.published(None)
        if self._done():
            self.finished = time.perf_counter()
            self.conn.close()

    def _on_confirm(self, frame: Any) -> None:
        if self.problem is not None:
            return  # failed already: what is confirmed from now on is not counted
        self.progress_at = time.monotonic()
        acked, items = self.pending.confirmed(frame.method)
        if not acked:
            # Set before _fail: with the last message settled the run looks done, and _fail
            # would take the nack for a timer firing after success (and never close).
            self.problem = f"the broker refused delivery tag {frame.method.delivery_tag}"
            self._fail(self.problem)
            return
        self.confirmed += len(items)
        if self.problem is None:
            self._top_up()

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if not self._done():
            self._fail(f"the channel closed: {reason}")

    def _done(self) -> bool:
        return self.exhausted and not self.pending

    def _on_return(self, _channel: Any, _method: Any, props: Any, _body: bytes) -> None:
        self._fail(f"message {props.message_id} was unroutable")

    def _fail(self, why: str) -> None:
        if self.problem is None and self._done():
            return  # every message is confirmed: a timer firing while closing changes nothing
        if self.problem is None:
            self.problem = why
        if self.conn.is_open:
            self.conn.close()
        elif not self.conn.is_closing:
            self.conn.ioloop.stop()

    def _on_closed(self, _conn: Any, reason: BaseException) -> None:
        if self.problem is None and not self._done():
            self.problem = f"the connection closed: {reason}"
        self.conn.ioloop.stop()
