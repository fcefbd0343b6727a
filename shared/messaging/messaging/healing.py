"""A read model that lost its store heals itself: it asks the producer to replay.

The read model's store keeps a generation marker next to its data. A store that lost its data
(a Redis restarted without persistence, a FLUSHDB) or a brand-new one has no marker: `check()`
then writes one in state `rebuilding` and sends a replay request through the broker (replay.py).
The producer replays the latest event of every entity to the model's queue and ends with a
completion message; the consumer runtime hands it to `completed()`, which marks the generation
`ready`. A request that got no answer is sent again after `re_request_after` seconds. An operator's
rebuild (wipe, then let the model heal) sets the state `wiping` first, so no replay is asked for
before the wipe is over. Replicas of one consumer share the store: the marker is written only
where there is none, so one of them asks.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from .replay import request_replay

log = logging.getLogger("messaging.healing")

READY, REBUILDING, WIPING = "ready", "rebuilding", "wiping"


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

    def begin_rebuild(self, request_id: str, since: float) -> None: ...
    def finish_rebuild(self, request_id: str) -> bool: ...


class Healing:
    def __init__(
        self,
        store: GenerationStore,
        amqp_url: str,
        exchange: str,
        queue: str,
        re_request_after: float = 600.0,
    ) -> None:
        self.store, self.amqp_url, self.exchange, self.queue = store, amqp_url, exchange, queue
        self.re_request_after = re_request_after

    def check(self) -> str:
        """Look at the marker, ask for a replay if the store lost its data; return the state."""
        generation = self.store.generation()
        now = time.time()
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
            self._request(request_id, now)
            return REBUILDING
        if generation.state == REBUILDING and now - generation.since > self.re_request_after:
            self._request(generation.request_id, now)
        return generation.state

    def completed(self, request_id: str) -> None:
        """The producer finished replaying for this request."""
        if self.store.finish_rebuild(request_id):
            log.info("read model of %s rebuilt (request %s)", self.queue, request_id)
        else:
            log.info("ignored the completion of replay request %s: not the current one", request_id)

    def _request(self, request_id: str, now: float) -> None:
        # Marked as sent before sending: a completion can never find the marker missing. If
        # sending fails, the marker says "not sent" and the next check sends it.
        self.store.begin_rebuild(request_id, now)
        try:
            request_replay(self.amqp_url, self.exchange, self.queue, request_id)
        except Exception:
            self.store.begin_rebuild(request_id, 0.0)
            raise
