"""Dead letters: look at them without consuming them, group them by reason, replay or discard
the ones chosen, in bounded slices. The `messaging dlq` command and the operators' console use it.

A dead queue may hold hundreds of thousands of messages, and a message read and not yet settled
is invisible to every other reader. So no operation here holds more than `window` messages
unacknowledged at a time, and none keeps a body it does not need:

- Looking takes at most `window` messages from the head of the queue, keeps their headers (and
  the bodies the caller asks for), and gives them all back at once: a look is brief, shows
  "N of M", and never consumes a dead letter (dead queues have no delivery limit). Groups come
  from headers only. On RabbitMQ 3.x a message given back goes to the tail of a quorum queue, so
  two looks at a queue larger than the window see different windows; on 4.x the same one.
- Replaying and discarding work slice by slice: take at most `window` messages, settle each,
  then take the next slice. A replayed message is published to the dead queue's own work queue
  (never to a queue a header names) with a publisher confirm and acknowledged only after it,
  without its failure headers, so it gets a fresh set of retries. A message that was not chosen
  is moved to the tail of the dead queue the same way (republished with a confirm, then
  acknowledged): that is how a choice of ids from an earlier look reaches past the first window
  without holding the queue, and without meeting the same head again (a message given back may
  return to the head). A crash between a confirm and its acknowledgement leaves a copy twice,
  never none.
- A scan ends when every chosen id was found (the first message with each id; a duplicate
  further on stays), when it has taken as many messages as the queue held when it began, or
  when the queue stays empty for `settle` seconds (another reader may be giving back what it
  held). So it always ends, and its counts say what happened: how many it replayed or
  discarded, which chosen ids it did not find among how many it scanned, how many messages are
  in the dead queue when it ends (dead again, newly dead, or given back by another reader), and
  whether another reader was attached while it ran (what a reader holds is invisible to
  everyone else, so it was not seen). A replay marks what it sends (`x-dlq-replay`), so a
  message that dies again during the same replay is not sent twice by it.
- Messages are read by a consumer with a prefetch of `window`, never by basic.get: on RabbitMQ
  3.x each message got holds a consumer of its own in a quorum queue, its acknowledgement is a
  settlement of its own, and settlements past the first few dozen wait in the channel and are
  lost if it closes first, so a message moved to the tail would come back and be there twice.
"""

from __future__ import annotations

import copy
import hashlib
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from pika.adapters.blocking_connection import BlockingChannel

from .connection import connect
from .publisher import ConfirmedPublisher, Outgoing, PublishError
from .retry import resent_properties

DEFAULT_WINDOW = 500
SETTLE_SECONDS = 2.0
RUN_HEADER = "x-dlq-replay"  # the replay that sent a message back to its work queue

# Headers the failure path adds; a replayed message starts again without them.
FAILURE_HEADERS = (
    "x-death",
    "x-attempts",
    "x-first-failure-at",
    "x-exception-type",
    "x-last-error",
    "x-dead-reason",
    "x-dead-at",
    "x-original-queue",
    "x-delivery-count",  # quorum queues count our looks at the dead queue
    RUN_HEADER,
)


def dead_queue_name(queue: str) -> str:
    return queue if queue.endswith(".dead") else f"{queue}.dead"


def text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def give_back(channel: BlockingChannel) -> None:
    """Return every message read and not acknowledged to its queue, as it was.

    basic.nack with requeue is a plain return (RabbitMQ 4.3 counts only basic.reject toward a
    delivery limit); dead queues are declared without a limit anyway (topology.py).
    """
    if channel.is_open:
        channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)


def dead_reason(headers: dict[str, Any]) -> str:
    """Why a message is dead: our header, else what the broker's own dead-lettering recorded."""
    if "x-dead-reason" in headers:
        return text(headers["x-dead-reason"])
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        reason = text(deaths[0].get("reason", "?"))
        queue = text(deaths[0].get("queue", "?"))
        if reason == "delivery_limit":
            return f"delivery limit: {queue} delivered it too often without it being settled"
        return f"dead-lettered by the broker from {queue}: {reason}"
    return "(no reason recorded)"


_VARYING = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|'[^']*'|\"[^\"]*\"|\d+"
)


def normalised(reason: str) -> str:
    """A reason with what varies from message to message (ids, numbers, quoted values)
    replaced, so that the same failure groups together."""
    return _VARYING.sub("…", reason)[:300]


@dataclass(frozen=True)
class Letter:
    """One dead message as it was looked at; its body only if the looker kept it."""

    id: str  # its message_id, else a digest of its body and headers
    message_id: str | None
    type: str | None
    headers: dict[str, Any]
    body: bytes | None
    reason: str
    exception: str
    dead_at: str

    @property
    def group(self) -> str:
        return f"{self.exception}: {normalised(self.reason)}"


def letter_id(properties: Any, body: bytes) -> str:
    if isinstance(properties.message_id, str) and properties.message_id:
        return properties.message_id
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    seed = body + text(headers.get("x-dead-at", "")).encode()
    return f"sha1:{hashlib.sha1(seed).hexdigest()[:16]}"


def letter(properties: Any, body: bytes, keep_body: bool = False) -> Letter:
    """A message of a dead queue as a Letter (with its body only when asked)."""
    headers = dict(properties.headers) if isinstance(properties.headers, dict) else {}
    return Letter(
        id=letter_id(properties, body),
        message_id=properties.message_id if isinstance(properties.message_id, str) else None,
        type=properties.type if isinstance(properties.type, str) else None,
        headers=headers,
        body=body if keep_body else None,
        reason=dead_reason(headers),
        exception=text(headers.get("x-exception-type", "Broker")),
        dead_at=text(headers.get("x-dead-at", "")),
    )


@dataclass(frozen=True)
class Look:
    """What one look saw: `letters` of the `depth` messages the queue held when it began."""

    letters: list[Letter]
    depth: int

    @property
    def partial(self) -> bool:
        return len(self.letters) < self.depth


@dataclass
class Outcome:
    """What a replay, discard or search did, in numbers an operator can trust."""

    depth: int = 0  # messages in the dead queue when it began
    done: int = 0  # replayed or discarded
    scanned: int = 0  # messages taken and looked at
    missing: list[str] = field(default_factory=list)  # chosen ids not found among `scanned`
    # Messages in the dead queue when it ended (a quorum queue takes back what the closed reader
    # held a moment later: up to a window of them may not be counted yet).
    remaining: int = 0
    # The most other readers seen attached while it ran: what they held, it could not see.
    other_readers: int = 0


class Interrupted(Exception):
    """The broker did not confirm a slice; `outcome` says what was done before."""

    def __init__(self, why: str, outcome: Outcome) -> None:
        super().__init__(why)
        self.outcome = outcome


class Action(Enum):
    SEND = "send"  # to the work queue, then acknowledge
    DROP = "drop"  # acknowledge only
    PASS = "pass"  # to the tail of the dead queue, then acknowledge
    KEEP = "keep"  # give back as it is


# Decides each taken message's action, given its Letter (no body) and its body.
Decide = Callable[[Letter, bytes], Action]


class DeadLetters:
    """One dead queue, read and settled at most `window` messages at a time (module docstring)."""

    def __init__(
        self,
        amqp_url: str,
        queue: str,
        window: int = DEFAULT_WINDOW,
        settle: float = SETTLE_SECONDS,
        client_name: str = "dead-letters",
    ) -> None:
        if window < 1:
            raise ValueError("the window must hold at least one message")
        self.amqp_url, self.queue = amqp_url, dead_queue_name(queue)
        self.work_queue = self.queue.removesuffix(".dead")
        self.window, self.settle, self.client_name = window, settle, client_name

    # -- looking -----------------------------------------------------------------------------
    def look(self, keep_body: Callable[[Letter, bytes], bool] | None = None) -> Look:
        """At most `window` letters from the head, given back at once; bodies where asked."""
        with self._reader() as reader:
            depth = reader.depth()
            letters = []
            for _, properties, body in reader.take(min(depth, self.window), self.settle):
                seen = letter(properties, body)
                if keep_body is not None and keep_body(seen, body):
                    seen = letter(properties, body, keep_body=True)
                letters.append(seen)
        return Look(letters, max(depth, len(letters)))

    def find(self, letter_id: str) -> tuple[Letter | None, Outcome]:
        """The letter with this id, with its body, searched for past the first window."""
        found: list[Letter] = []

        def decide(seen: Letter, body: bytes) -> Action:
            if seen.id == letter_id:
                found.append(replace(seen, body=body))
                return Action.KEEP
            return Action.PASS

        outcome = self._scan(decide, until=lambda: bool(found))
        outcome.missing = [] if found else [letter_id]
        return (found[0] if found else None), outcome

    # -- acting ------------------------------------------------------------------------------
    def replay(self, ids: Iterable[str] | None) -> Outcome:
        """Send the chosen letters (every one, for None) back to the work queue."""
        run = uuid.uuid4().hex
        if ids is None:

            def everything(seen: Letter, _body: bytes) -> Action:
                # One that died again during this replay stays for the operator.
                return Action.PASS if text(seen.headers.get(RUN_HEADER, "")) == run else Action.SEND

            return self._scan(everything, run=run)
        return self._chosen(set(ids), Action.SEND, run)

    def discard(self, ids: Iterable[str]) -> Outcome:
        """Remove the chosen letters for good."""
        return self._chosen(set(ids), Action.DROP, "")

    def _chosen(self, chosen: set[str], action: Action, run: str) -> Outcome:
        left = set(chosen)

        def decide(seen: Letter, _body: bytes) -> Action:
            if seen.id in left:
                left.discard(seen.id)
                return action
            return Action.PASS

        outcome = self._scan(decide, until=lambda: not left, run=run)
        outcome.missing = sorted(left)
        return outcome

    # -- the scan ----------------------------------------------------------------------------
    def _scan(
        self, decide: Decide, until: Callable[[], bool] = lambda: False, run: str = ""
    ) -> Outcome:
        """Take slices until `until()`, the depth it began with, or an empty queue."""
        publisher = ConfirmedPublisher(self.amqp_url, "", self.client_name, window=self.window)
        with self._reader() as reader:
            outcome = Outcome(depth=reader.depth())
            outcome.other_readers = reader.others()
            while not until() and outcome.scanned < outcome.depth:
                most = min(self.window, outcome.depth - outcome.scanned)
                taken = reader.take(most, patience=self.settle)
                if not taken:
                    break  # empty for `settle` seconds: nothing more to come back
                outcome.scanned += len(taken)
                outcome.other_readers = max(outcome.other_readers, reader.others())
                actions = [
                    # Once done, the rest of the slice is given back as it is.
                    Action.KEEP if until() else decide(letter(properties, body), body)
                    for _, properties, body in taken
                ]
                self._settle(reader, publisher, taken, actions, run, outcome)
        # Read after the reader's connection closed, so nothing of this scan is still held.
        with self._reader() as reader:
            outcome.remaining = reader.depth()
            outcome.other_readers = max(outcome.other_readers, reader.others())
        return outcome

    def _settle(
        self,
        reader: _Reader,
        publisher: ConfirmedPublisher,
        taken: list[tuple[Any, Any, bytes]],
        actions: list[Action],
        run: str,
        outcome: Outcome,
    ) -> None:
        """Publish a slice's moves with confirms, then acknowledge; what is kept stays held."""
        moves = [
            self._move(properties, body, action, run)
            for (_, properties, body), action in zip(taken, actions, strict=True)
            if action in (Action.SEND, Action.PASS)
        ]
        try:
            if moves:
                publisher.publish_all(moves)
        except PublishError as exc:
            # The originals go back when the reader closes; what was confirmed is there twice.
            raise Interrupted(str(exc), outcome) from exc
        settled = [
            method
            for (method, _, _), action in zip(taken, actions, strict=True)
            if action is not Action.KEEP
        ]
        # Kept ones end a scan, so they follow every settled one: one acknowledgement for all.
        if settled:
            reader.ack_through(settled[-1].delivery_tag)
        outcome.done += sum(a in (Action.SEND, Action.DROP) for a in actions)

    def _move(self, properties: Any, body: bytes, action: Action, run: str) -> Outgoing:
        headers = dict(properties.headers) if isinstance(properties.headers, dict) else {}
        if action is Action.PASS:  # to the tail, as it is (the broker counts afresh)
            headers.pop("x-delivery-count", None)
            moved = copy.copy(properties)
            moved.headers = headers
            return Outgoing(self.queue, body, _sendable(moved))
        fresh = {k: v for k, v in headers.items() if k not in FAILURE_HEADERS}
        fresh["x-replayed-at"] = datetime.now(UTC).isoformat()
        if run:
            fresh[RUN_HEADER] = run
        # Always its own work queue: a header naming another queue must not route it there.
        return Outgoing(self.work_queue, body, _sendable(resent_properties(properties, fresh)))

    @contextmanager
    def _reader(self) -> Iterator[_Reader]:
        conn = connect(self.amqp_url, self.client_name)
        try:
            reader = _Reader(conn.channel(), self.queue, self.window)
            yield reader
            reader.give_back()
        finally:
            if conn.is_open:
                conn.close()


class _Reader:
    """A consumer of the dead queue that never holds more than `window` messages; a slice is
    settled by one acknowledgement (the module docstring says why not basic.get)."""

    def __init__(self, channel: BlockingChannel, queue: str, window: int) -> None:
        self.channel, self.queue = channel, queue
        channel.basic_qos(prefetch_count=window)
        self._messages: Iterator[tuple[Any, Any, bytes]] | None = None

    def depth(self) -> int:
        return _depth(self.channel, self.queue)

    def others(self) -> int:
        """Readers of the queue besides this one (on RabbitMQ 3.x, each message another
        reader got and holds counts as one)."""
        attached = self.channel.queue_declare(self.queue, passive=True).method.consumer_count
        return max(0, attached - (self._messages is not None))

    def take(self, most: int, patience: float) -> list[tuple[Any, Any, bytes]]:
        """Up to `most` messages as they come; waits up to `patience` seconds for the first."""
        if most < 1:
            return []
        if self._messages is None:
            self._messages = self.channel.consume(self.queue, inactivity_timeout=0.1)
        taken: list[tuple[Any, Any, bytes]] = []
        deadline = time.monotonic() + patience
        for method, properties, body in self._messages:
            if method is not None:
                taken.append((method, properties, body))
                if len(taken) >= most:
                    break
            elif taken or time.monotonic() >= deadline:
                break
        return taken

    def ack_through(self, tag: int) -> None:
        self.channel.basic_ack(tag, multiple=True)

    def give_back(self) -> None:
        """Stop the consumer and return what it holds, as it was."""
        if self._messages is not None and self.channel.is_open:
            self.channel.cancel()  # returns what arrived and was not taken yet
        give_back(self.channel)
        if self.channel.is_open:
            # The queue takes the nack before it answers this channel's next question: once a
            # look returns, its window is back and the next reader counts it.
            _depth(self.channel, self.queue)


def _depth(channel: BlockingChannel, queue: str) -> int:
    """Messages ready in the queue (not those another reader holds)."""
    return channel.queue_declare(queue, passive=True).method.message_count


def _sendable(properties: Any) -> Any:
    """The properties, or, if their headers cannot be encoded again, the same without them."""
    try:
        properties.encode()
        return properties
    except Exception as exc:
        kept = copy.copy(properties)
        kept.headers = {"x-headers-dropped": f"{type(exc).__name__}: {exc}"[:200]}
        return kept
