"""A read model that lost its store heals itself: it asks the producer to replay.

The read model's store keeps a generation marker next to its data. A store that lost its data
(a Redis restarted without persistence, a FLUSHDB) or a brand-new one has no marker: `check()`
then writes one in state `rebuilding` and sends a replay request through the broker (replay.py).
The producer replays the latest event of every entity to the model's queue, each carrying the
request's id, and ends with a completion message that says how many it sent. The consumer
runtime counts the replayed events it settled for good (`replayed()`) and hands the completion
to `completed()`: the generation turns `ready` only once both agree, so replicas that still hold
replayed events, or a replayed event waiting in a retry queue, keep the model `rebuilding`. A
request that got no answer is sent again after `re_request_after` seconds.

An operator's rebuild (wipe, then let the model heal) sets the state `wiping` first, so no
replay is asked for before the wipe is over; the wipe renews the marker's time as it goes. A
wipe that stopped renewing it for `stale_wipe_after` seconds was interrupted (a restart, a
store blip): the marker is taken over and the model heals, since nothing else would ever clear
it. Replicas of one consumer share the store: the marker is written only where there is none,
so one of them asks.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from .replay import COMPLETED_TYPE, LATEST, REQUEST_HEADER, request_replay

log = logging.getLogger("messaging.healing")

READY, REBUILDING, WIPING = "ready", "rebuilding", "wiping"
STALE_WIPE_SECONDS = 120.0  # a wipe renews its marker far more often than this


def replay_request_of(properties: Any) -> str | None:
    """The replay request a delivered event answers, if it is a replayed one (a completion
    message is not an event)."""
    if getattr(properties, "type", None) == COMPLETED_TYPE:
        return None
    headers = getattr(properties, "headers", None)
    value = headers.get(REQUEST_HEADER) if isinstance(headers, dict) else None
    return value if isinstance(value, str) and value else None


def replay_completion(properties: Any, body: bytes) -> tuple[str, int] | str | None:
    """A replay-completed message's request id and event count; a reason (text) if it is one
    that cannot be read; None for any other message."""
    if getattr(properties, "type", None) != COMPLETED_TYPE:
        return None
    try:
        content = json.loads(body)
        request_id, events = content["request_id"], content.get("events", 0)
    except (ValueError, TypeError, KeyError, AttributeError):
        return "a replay-completed message that cannot be read"
    if not isinstance(request_id, str) or not request_id:
        return "a replay-completed message without a request id"
    if isinstance(events, bool) or not isinstance(events, int) or events < 0:
        return "a replay-completed message whose event count is not a count"
    return request_id, events


@dataclass(frozen=True)
class Generation:
    state: str  # READY, REBUILDING or WIPING
    request_id: str
    since: float  # epoch seconds of the last request (0: not sent yet)


class GenerationStore(Protocol):
    """What a read model's store keeps for healing: one marker beside its data."""

    def generation(self) -> Generation | None: ...

    def claim_rebuild(self, request_id: str) -> bool:
        """Write a `rebuilding` marker (not sent yet) only if there is none: True if written."""
        ...

    def begin_rebuild(self, request_id: str, since: float) -> None:
        """The marker `rebuilding` for this request, sent at `since` (0: not sent), with no
        replayed event counted yet."""
        ...

    def renew_rebuild(self, request_id: str, since: float) -> bool:
        """`begin_rebuild`, but only while the marker is still this request's rebuild: True if
        it was (another party's request or wipe written meanwhile is left alone)."""
        ...

    def finish_rebuild(self, request_id: str, events: int) -> bool:
        """The completion of this request, which sent `events`: `ready` if that many were
        counted already. True if it turned the model ready."""
        ...

    def count_replayed(self, request_id: str, settled: int) -> bool:
        """Count settled replayed events of this request (only while it is the current one);
        `ready` once the completion's number is reached. True if it turned the model ready."""
        ...

    def abandon(self, request_id: str) -> bool:
        """Remove the marker if it is still this request's (a stale wipe): True if removed."""
        ...


class Healing:
    """Heal a read model that lost its store: ask the producer for a replay, through the broker.

    `store` keeps the generation marker beside the model's data (`RedisGeneration`,
    `PostgresGeneration`, or your own `GenerationStore`): a store without one lost its data, so
    the consumer writes the marker `rebuilding` and asks for a replay to its `queue`, and the
    model is `ready` again once every replayed event it was sent is applied. A request with no
    answer is sent again after `re_request_after` seconds; an operator's wipe that made no
    progress for `stale_wipe_after` seconds is taken over. `scope` is what is replayed: each
    entity's latest event (`"latest"`, for a model that keeps the latest state) or every event
    the outbox still holds (`"history"`, for a model that accumulates).
    """

    def __init__(
        self,
        store: GenerationStore,
        amqp_url: str,
        exchange: str,
        queue: str,
        re_request_after: float = 600.0,
        stale_wipe_after: float = STALE_WIPE_SECONDS,
        scope: str = LATEST,
    ) -> None:
        self.store, self.amqp_url, self.exchange, self.queue = store, amqp_url, exchange, queue
        self.re_request_after = re_request_after
        self.stale_wipe_after = stale_wipe_after
        self.scope = scope
        self.state = READY  # as the last check found it, or the rebuild this process finished

    def check(self) -> str:
        """Look at the marker, ask for a replay if the store lost its data; return the state."""
        self.state = self._check()
        return self.state

    def _check(self) -> str:
        generation = self.store.generation()
        now = time.time()
        if (
            generation is not None
            and generation.state == WIPING
            and now - generation.since > self.stale_wipe_after
            and self.store.abandon(generation.request_id)
        ):
            log.warning(
                "read model of %s: a wipe made no progress for %.0fs; taking over, healing",
                self.queue,
                now - generation.since,
            )
            generation = None
        if generation is None:
            request_id = str(uuid.uuid4())
            # Replicas of the consumer check the same store: the one that writes the marker
            # asks; the others find it written and wait with it.
            if not self.store.claim_rebuild(request_id):
                claimed = self.store.generation()
                return claimed.state if claimed is not None else REBUILDING
            log.warning(
                "read model of %s has no generation marker: asking for a replay", self.queue
            )
            return self._request(request_id, now)
        if generation.state == REBUILDING and now - generation.since > self.re_request_after:
            return self._request(generation.request_id, now)
        return generation.state

    def completed(self, request_id: str, events: int) -> None:
        """The producer finished replaying `events` events for this request."""
        if self.store.finish_rebuild(request_id, events):
            self.state = READY
            log.info("read model of %s rebuilt (request %s)", self.queue, request_id)
        else:
            log.info(
                "replay request %s completed with %d event(s); ready once all are applied",
                request_id,
                events,
            )

    def replayed(self, request_id: str, settled: int) -> None:
        """The consumer settled `settled` replayed events of this request for good."""
        if self.store.count_replayed(request_id, settled):
            self.state = READY
            log.info("read model of %s rebuilt (request %s)", self.queue, request_id)

    def _request(self, request_id: str, now: float) -> str:
        """Send this request if the marker is still its own; return the model's state.

        Marked as sent before sending: a completion can never find the marker missing. If
        sending fails, the marker says "not sent" and the next check sends it. A marker that
        another party rewrote since it was read (an operator's wipe, a rebuild begun by hand)
        is theirs: it is neither overwritten nor asked for here."""
        if not self.store.renew_rebuild(request_id, now):
            log.info("replay request %s of %s was superseded: not sent", request_id, self.queue)
            marker = self.store.generation()
            return marker.state if marker is not None else REBUILDING
        try:
            request_replay(self.amqp_url, self.exchange, self.queue, request_id, self.scope)
        except Exception:
            self.store.renew_rebuild(request_id, 0.0)
            raise
        return REBUILDING
