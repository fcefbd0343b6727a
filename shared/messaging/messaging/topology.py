"""Names and declarations of the exchange, work, retry and dead queues.

Every queue is a quorum queue, and every hop a message makes between them by dead-lettering is
at-least-once (`x-dead-letter-strategy: at-least-once` with `x-overflow: reject-publish`): the
broker keeps a dead-lettered message in its source queue until the target queue confirmed it,
so a retry that expires while the work queue is unavailable (a broker boot, a cluster minority)
waits instead of being dropped.

Queue arguments cannot be changed on an existing queue. A declaration the broker refuses as
inequivalent (a queue made by an older version of this module) is migrated: the messages move to
`<queue>.migrating`, the queue is declared again with the new arguments and they move back, with
publisher confirms, so nothing it held is lost. A migration interrupted half way is finished by
the next declaration.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import ChannelClosedByBroker

log = logging.getLogger("messaging.topology")

DEFAULT_RETRY_DELAYS: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0, 600.0)
"""The retry schedule in seconds (`RETRY_DELAYS`): one retry queue per step, then `<queue>.dead`."""
# Deliveries of one message the broker allows before it dead-letters it itself: the last
# resort against a message that kills its consumer before it can be settled (the runtime
# dead-letters such a message earlier, at MAX_REDELIVERIES; see consumer.py).
DELIVERY_LIMIT = 20
_PRECONDITION_FAILED, _NOT_FOUND, _RESOURCE_LOCKED = 406, 404, 405


class MigrationBusy(pika.exceptions.AMQPError):
    """A queue needs migrating but cannot be now (consumers attached, or another migrator)."""


def declare_exchange(channel: BlockingChannel, exchange: str) -> None:
    """Declare the durable fanout exchange every producer publishes to."""
    channel.exchange_declare(exchange=exchange, exchange_type="fanout", durable=True)


def broker_version(conn: BlockingConnection) -> tuple[int, ...]:
    """The RabbitMQ version the connection's broker announced, e.g. (3, 10, 8)."""
    raw = conn._impl.server_properties.get("version", b"0")  # pika keeps it there
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3]) or (0,)


def _delay_label(seconds: float) -> str:
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


@dataclass(frozen=True)
class Topology:
    """One consuming service's queues on one exchange.

    Work queue `<service>.<exchange>`; one retry queue per delay step, whose queue-level TTL
    dead-letters the message back to the work queue (a per-message TTL would only expire at the
    head of a shared queue); and `<queue>.dead` for what can never be processed, which is also
    where the broker dead-letters a message past DELIVERY_LIMIT deliveries. `group_size` is the
    initial number of replicas of each queue in a cluster (None: the broker's default).
    """

    service: str
    exchange: str
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    group_size: int | None = None

    @property
    def queue(self) -> str:
        return f"{self.service}.{self.exchange}"

    @property
    def dead_queue(self) -> str:
        return f"{self.queue}.dead"

    def retry_queue(self, step: int) -> str:
        """Name of the queue that holds a message for its step-th retry delay (0-based)."""
        return f"{self.queue}.retry.{_delay_label(self.retry_delays[step])}"

    @property
    def retry_queues(self) -> tuple[str, ...]:
        return tuple(self.retry_queue(step) for step in range(len(self.retry_delays)))

    def arguments(self, version: tuple[int, ...] = (3,)) -> dict[str, dict[str, Any]]:
        """Each queue's declaration arguments on a broker of this version, in declaring order:
        retry queues first, so that their expiries are at-least-once before the work queue
        could be briefly away (during its own migration)."""
        base: dict[str, Any] = {"x-queue-type": "quorum"}
        if self.group_size is not None:
            base["x-quorum-initial-group-size"] = self.group_size
        at_least_once = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        queues: dict[str, dict[str, Any]] = {}
        for step, delay in enumerate(self.retry_delays):
            queues[self.retry_queue(step)] = {
                **base,
                "x-message-ttl": round(delay * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.queue,
                **at_least_once,
            }
        # RabbitMQ 4 gives quorum queues a delivery limit of 20 by default; a dead queue must
        # keep its messages however often they are looked at (-1: no limit, from 4.0 on; on
        # 3.x -1 would drop a message at its first return, and there is no default limit).
        queues[self.dead_queue] = {**base, **({"x-delivery-limit": -1} if version >= (4,) else {})}
        queues[self.queue] = {
            **base,
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dead_queue,
            **at_least_once,
        }
        return queues

    def declare(self, conn: BlockingConnection) -> None:
        """Declare (idempotently) the exchange and every queue, migrating old declarations."""
        _ensure_exchange(conn, self.exchange)
        for name, arguments in self.arguments(broker_version(conn)).items():
            bound = self.exchange if name == self.queue else None
            _ensure_queue(conn, name, arguments, bound)

    def delete(self, channel: BlockingChannel) -> None:
        """Delete every queue of this topology (tests and teardown only)."""
        for name in (self.queue, self.dead_queue, *self.retry_queues):
            channel.queue_delete(queue=name)


def _ensure_exchange(conn: BlockingConnection, exchange: str) -> None:
    """Declare the exchange unless it exists: looking it up passively needs no permission, so a
    consumer's role needs none on the exchange the relay (or the migrate step) declared."""
    try:
        with _channel(conn) as channel:
            channel.exchange_declare(exchange=exchange, passive=True)
            return
    except ChannelClosedByBroker as exc:
        if exc.reply_code != _NOT_FOUND:
            raise
    with _channel(conn) as channel:
        declare_exchange(channel, exchange)


@contextlib.contextmanager
def _channel(conn: BlockingConnection, confirm: bool = False) -> Any:
    channel = conn.channel()
    if confirm:
        channel.confirm_delivery()
    try:
        yield channel
    finally:
        if channel.is_open:
            channel.close()


def _ensure_queue(
    conn: BlockingConnection, name: str, arguments: dict[str, Any], exchange: str | None
) -> None:
    try:
        with _channel(conn) as channel:
            channel.queue_declare(name, durable=True, arguments=arguments)
            if exchange is not None:
                channel.queue_bind(name, exchange)
    except ChannelClosedByBroker as exc:
        if exc.reply_code != _PRECONDITION_FAILED:
            raise
        log.warning("queue %s was declared differently (%s); migrating it", name, exc.reply_text)
        _migrate(conn, name, arguments, exchange)
    _finish_interrupted(conn, name, exchange)


def _holding(name: str) -> str:
    return f"{name}.migrating"


def _declare_holding(channel: BlockingChannel, name: str) -> str:
    """The queue that holds a queue's messages while it is declared again: a classic queue,
    cheap to declare and delete, since the next declaration of any process looks for it."""
    holding = _holding(name)
    channel.queue_declare(holding, durable=True, arguments={"x-queue-type": "classic"})
    return holding


def _migrate(
    conn: BlockingConnection, name: str, arguments: dict[str, Any], exchange: str | None
) -> None:
    """Re-declare `name` with new arguments, keeping every message it holds."""
    with _migration_lock(conn, name):
        with _channel(conn, confirm=True) as channel:
            consumers = channel.queue_declare(name, passive=True).method.consumer_count
            if consumers:
                raise MigrationBusy(f"{name} must be migrated but has {consumers} consumer(s)")
            holding = _declare_holding(channel, name)
            if exchange is not None:  # new events wait in the holding queue meanwhile
                channel.queue_bind(holding, exchange)
                channel.queue_unbind(name, exchange)
            moved = _move(channel, name, holding)
        moved += _delete_when_empty(conn, name, holding)
        # A channel that used the old queue must not publish to the new one of the same name
        # (RabbitMQ 3.10 keeps the old queue's type for it and closes the connection).
        with _channel(conn, confirm=True) as channel:
            channel.queue_declare(name, durable=True, arguments=arguments)
            if exchange is not None:
                channel.queue_bind(name, exchange)
                channel.queue_unbind(holding, exchange)
            _move(channel, holding, name)
            channel.queue_delete(holding)
        log.warning("migrated queue %s (%d message(s) kept)", name, moved)


def _finish_interrupted(conn: BlockingConnection, name: str, exchange: str | None) -> None:
    """Move back what a migration left in `<name>.migrating`, then delete that queue.

    The holding queue is declared (a cheap classic queue: it only ever holds messages for
    the length of a migration) and deleted again if empty, so the common case costs no error.
    Under the migration lock, so a migration in progress elsewhere is left alone.
    """
    try:
        with _migration_lock(conn, name), _channel(conn, confirm=True) as channel:
            holding = _holding(name)
            waiting = channel.queue_declare(
                holding, durable=True, arguments={"x-queue-type": "classic"}
            ).method.message_count
            if exchange is not None:
                channel.queue_unbind(holding, exchange)
            moved = _move(channel, holding, name) if waiting else 0
            channel.queue_delete(holding)
            if not moved:
                return
            log.warning(
                "finished an interrupted migration of %s: %d message(s) moved back", name, moved
            )
    except MigrationBusy:
        pass  # a migration is running elsewhere: it finishes its own work


def _delete_when_empty(conn: BlockingConnection, name: str, holding: str) -> int:
    """Delete `name` once it is empty, moving to `holding` what arrives meanwhile.

    Quorum queues cannot be deleted "if empty", so this looks, then deletes: a message routed
    to the queue by name (a retry expiring) in the instant between the two would be lost, and
    is reported. Upgrade with the consumers stopped and no retries due to make that moot.
    """
    moved = 0
    with _channel(conn, confirm=True) as channel:
        while channel.queue_declare(name, passive=True).method.message_count:
            moved += _move(channel, name, holding)
    with _channel(conn) as channel:
        lost = channel.queue_delete(name).method.message_count
    if lost:
        log.error("%d message(s) reached %s while it was being deleted for migration", lost, name)
    return moved


def _move(channel: BlockingChannel, source: str, target: str) -> int:
    """Move every message from source to target: publish (confirmed), then ack the original."""
    moved = 0
    while True:
        method, properties, body = channel.basic_get(source, auto_ack=False)
        if method is None:
            return moved
        channel.basic_publish("", target, body, properties, mandatory=True)
        channel.basic_ack(method.delivery_tag)
        moved += 1


@contextlib.contextmanager
def _migration_lock(conn: BlockingConnection, name: str) -> Any:
    """One migrator per queue: an exclusive queue, which the broker lets one connection hold."""
    lock = f"{name}.migration-lock"
    try:
        with _channel(conn) as channel:
            channel.queue_declare(lock, exclusive=True, auto_delete=True)
    except ChannelClosedByBroker as exc:
        if exc.reply_code == _RESOURCE_LOCKED:
            raise MigrationBusy(f"another process is migrating {name}") from None
        raise
    try:
        yield
    finally:
        if conn.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError), _channel(conn) as channel:
                channel.queue_delete(lock)
