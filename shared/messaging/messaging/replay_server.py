"""The producer's side of self-healing read models: serve replay requests (replay.py).

Who may be replayed to: only the queues the composition root names as targets (the work
queues of the consuming services). A request naming any other queue would get the producer's
whole state, so it is refused like a message that is not a request at all: acknowledged,
logged once with its reason, counted in `refused`, never served or retried.

What: the latest event of every entity, every event the outbox holds (HISTORY), the latest
events of some buckets of entities (a verification's repair), or the producer's digests (a
verification's question, answered at most once a second per target and not counted as a replay:
one small table read).

How often: at most one replay per target per `min_interval` seconds, counted from the end of
the previous one. A request that arrives sooner waits, held unacknowledged (a server that stops
leaves it to another), and is coalesced: every request waiting for a target when its next
replay starts is answered by that one replay, each id with its own completion message. The
events carry the id of the newest request, which is the one a read model wiped again since
its earlier request waits for. The limit is per server process (a standby relay runs one too).

What it survives: nothing but stop() ends it. A request is judged by its body only, and any
exception while judging refuses it. A replay that fails (the database or the broker away) is
logged once and tried again after a backoff of its own target's, while other targets are
served. Anything else (the connection lost) ends the session, which starts again after a
backoff. A request whose client library cannot even decode it ends the connection before it
can be acknowledged: the requests queue's delivery limit drops it after a few tries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import ChannelClosedByBroker

from .connection import Backoff, StopFlag, connect
from .replay import (
    DIGESTS,
    HISTORY,
    NotARequest,
    Request,
    declare_requests,
    parse_request,
    replay,
    send_digests,
)

log = logging.getLogger("messaging.replay")

# Digests (a verification's question) are answered at most this often per target, replays or
# not: many requests in the meantime get one answer.
DIGESTS_MIN_INTERVAL = 1.0

# Refusals, by kind (ReplayServer.refused).
NOT_A_REQUEST, UNKNOWN_TARGET, MISSING_QUEUE = "not a request", "unknown target", "missing queue"


class Refused(Exception):
    """A request the server will not serve: its kind and why."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


@dataclass
class Waiting:
    """The requests held for one target until its next replay."""

    ids: dict[str, None] = field(default_factory=dict)  # in order of arrival, newest last
    tags: list[int] = field(default_factory=list)
    request: Request | None = None  # the first: what they all ask for
    reply_to: dict[str, None] = field(default_factory=dict)

    def add(self, request: Request, tag: int) -> None:
        self.request = self.request or request
        self.ids.pop(request.request_id, None)
        self.ids[request.request_id] = None
        self.tags.append(tag)
        if request.reply_to:
            self.reply_to[request.reply_to] = None

    @property
    def newest(self) -> str:
        return next(reversed(self.ids))


class ReplayServer:
    """Serve read models' replay requests until stop(): the producer's side of healing.

    Only the work queues named in `targets` may be replayed to; any other request is
    acknowledged, logged with its reason and never served. A replay sends each entity's latest
    event, every event the outbox holds, or the latest events of some buckets (a verification's
    repair), then a completion message; a verification's question (the producer's digests) is
    answered at most once a second per target. One target gets at most one replay per
    `min_interval` seconds: requests arriving sooner wait, and are all answered by the next
    replay. A failed replay is tried again after a backoff; nothing a request carries stops the
    server.
    """

    def __init__(
        self,
        database_url: str,
        amqp_url: str,
        exchange: str,
        targets: Iterable[str],
        *,
        min_interval: float = 30.0,
        prefetch: int = 100,
    ) -> None:
        self.database_url, self.amqp_url, self.exchange = database_url, amqp_url, exchange
        self.targets = frozenset(targets)
        self.min_interval, self.prefetch = min_interval, prefetch
        self.replays = 0  # replays run; one may answer several requests
        self.served = 0  # requests answered
        self.refused: Counter[str] = Counter()
        self._stop = StopFlag()
        self._ended: dict[str, float] = {}  # target: when its last replay ended (monotonic)
        self._digests_at: dict[str, float] = {}  # target: when it last got the digests
        self._retry_at: dict[str, float] = {}  # target: not before (after a failed replay)
        self._failures: dict[str, Backoff] = {}

    def stop(self) -> None:
        self._stop.set()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="replay-server", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                self._session(backoff)
            # This thread is the server: nothing but stop() may end it, whatever was raised.
            except BaseException as exc:
                delay = backoff.next()
                log.warning("replay server interrupted (%s); again in %.1fs", _why(exc), delay)
                self._stop.wait(delay)

    def _session(self, backoff: Backoff) -> None:
        conn = connect(self.amqp_url, "replay-server")
        try:
            queue = declare_requests(conn, self.exchange)
            channel = conn.channel()
            channel.basic_qos(prefetch_count=self.prefetch)
            waiting: dict[tuple, Waiting] = {}  # Request.key: the requests one replay answers
            for method, _properties, body in channel.consume(queue, inactivity_timeout=0.5):
                if self._stop.is_set():
                    return
                if method is None:
                    backoff.reset()  # quiet and connected: a later failure starts afresh
                else:
                    self._take(channel, method.delivery_tag, body, waiting)
                # Serve only once what already arrived is taken, so a burst is coalesced.
                if channel.get_waiting_message_count() == 0:
                    self._serve_due(conn, channel, waiting)
        finally:
            if conn.is_open:
                conn.close()

    def _take(
        self,
        channel: BlockingChannel,
        tag: int,
        body: bytes,
        waiting: dict[tuple, Waiting],
    ) -> None:
        """Hold a request for its target's next replay, or refuse it."""
        try:
            request = parse_request(body)
            if request.queue not in self.targets:
                raise Refused(UNKNOWN_TARGET, f"{request.queue!r} is not a queue replays go to")
        except NotARequest as exc:
            self._refuse(Refused(NOT_A_REQUEST, str(exc)), body)
        except Refused as exc:
            self._refuse(exc, body)
        except Exception as exc:  # judging must not fail: whatever did is the request's fault
            self._refuse(Refused(NOT_A_REQUEST, f"cannot read it: {_why(exc)}"), body)
        else:
            waiting.setdefault(request.key, Waiting()).add(request, tag)
            return
        channel.basic_ack(tag)

    def _refuse(self, refusal: Refused, body: bytes) -> None:
        self.refused[refusal.kind] += 1
        log.warning("refused a replay request: %s (%r)", refusal, body[:120])

    def _serve_due(
        self,
        conn: BlockingConnection,
        channel: BlockingChannel,
        waiting: dict[tuple, Waiting],
    ) -> None:
        for key in list(waiting):
            target, scope = key[0], key[1]
            if self._stop.is_set() or time.monotonic() < self._due_at(target, scope):
                continue
            held = waiting.pop(key)
            if not self._answer(conn, target, held):
                waiting[key] = held  # held on to: tried again when due
                continue
            for tag in held.tags:
                channel.basic_ack(tag)

    def _due_at(self, target: str, scope: str) -> float:
        if scope == DIGESTS:  # a cheap answer (one small table): not held up by replays
            last, interval = self._digests_at.get(target, float("-inf")), DIGESTS_MIN_INTERVAL
        else:
            last, interval = self._ended.get(target, float("-inf")), self.min_interval
        return max(last + interval, self._retry_at.get(target, float("-inf")))

    def _answer(self, conn: BlockingConnection, target: str, held: Waiting) -> bool:
        """Replay once for every held request; True once they are answered or refused."""
        try:
            events = self._replay(conn, target, held)
        except Refused as exc:
            for _ in held.tags:
                self.refused[exc.kind] += 1
            log.warning("refused %d replay request(s): %s", len(held.tags), exc)
            return True
        except Exception as exc:
            delay = self._failures.setdefault(target, Backoff(first=1.0, cap=60.0)).next()
            self._retry_at[target] = time.monotonic() + delay
            log.warning("replay to %s failed (%s); again in %.1fs", target, _why(exc), delay)
            return False
        if events is None:
            return False  # stopped midway: the requests go back to the queue unanswered
        assert held.request is not None
        if held.request.scope == DIGESTS:
            self._digests_at[target] = time.monotonic()
        else:
            self._ended[target] = time.monotonic()
        self._failures.pop(target, None)
        self.replays += 1
        self.served += len(held.ids)
        log.info(
            "replayed %d event(s) to %s for request(s) %s", events, target, ", ".join(held.ids)
        )
        return True

    def _replay(self, conn: BlockingConnection, target: str, held: Waiting) -> int | None:
        """The replay's event count; None if stop() came first."""
        probe = conn.channel()
        try:
            probe.queue_declare(target, passive=True)
        except ChannelClosedByBroker:
            raise Refused(MISSING_QUEUE, f"queue {target} does not exist") from None
        finally:
            if probe.is_open:
                probe.close()
        newest = held.newest
        others = [rid for rid in held.ids if rid != newest]
        log.info("replaying to %s for request(s) %s", target, ", ".join(held.ids))
        # The replay publishes on a connection of its own, for as long as it takes; this one
        # keeps answering heartbeats meanwhile, or the broker would hand the held requests to
        # another server (or back to this one) before they are acknowledged.
        outcome: dict[str, Any] = {}

        request = held.request
        assert request is not None

        def work() -> None:
            try:
                if request.scope == DIGESTS:
                    send_digests(
                        self.database_url, self.amqp_url, target, list(held.ids), [*held.reply_to]
                    )
                    outcome["events"] = 0
                    return
                outcome["events"] = replay(
                    self.database_url,
                    self.amqp_url,
                    target,
                    after_id=0 if request.scope == HISTORY else None,  # every event, in order
                    buckets=request.buckets,
                    request_id=newest,
                    also_completes=others,
                )
            except BaseException as exc:  # reported to the server's thread, which contains it
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="replay", daemon=True)
        worker.start()
        while worker.is_alive() and not self._stop.is_set():
            conn.process_data_events(time_limit=0.5)
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("events")


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
