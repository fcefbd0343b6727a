"""Names and declarations of the exchange, work, retry and dead queues."""

from __future__ import annotations

from dataclasses import dataclass

from pika.adapters.blocking_connection import BlockingChannel

DEFAULT_RETRY_DELAYS: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0, 600.0)


def declare_exchange(channel: BlockingChannel, exchange: str) -> None:
    """Declare the durable fanout exchange every producer publishes to."""
    channel.exchange_declare(exchange=exchange, exchange_type="fanout", durable=True)


def _delay_label(seconds: float) -> str:
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


@dataclass(frozen=True)
class Topology:
    """One consuming service's queues on one exchange.

    Work queue `<service>.<exchange>` (quorum); one retry queue per delay step, whose queue-level
    TTL dead-letters the message back to the work queue (a per-message TTL would only expire at
    the head of a shared queue); and `<queue>.dead` for what can never be processed.
    """

    service: str
    exchange: str
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS

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

    def declare(self, channel: BlockingChannel) -> None:
        """Declare (idempotently) the exchange, the work queue and its retry and dead queues."""
        declare_exchange(channel, self.exchange)
        channel.queue_declare(queue=self.queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(queue=self.queue, exchange=self.exchange)
        channel.queue_declare(
            queue=self.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        for step, delay in enumerate(self.retry_delays):
            channel.queue_declare(
                queue=self.retry_queue(step),
                durable=True,
                arguments={
                    "x-message-ttl": round(delay * 1000),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.queue,
                },
            )

    def delete(self, channel: BlockingChannel) -> None:
        """Delete every queue of this topology (tests and teardown only)."""
        for name in (self.queue, self.dead_queue, *self.retry_queues):
            channel.queue_delete(queue=name)
