"""The consumer runtime against raw pika consuming, on the same queue in the same run.

Run: .venv/bin/python bench/consumer_bench.py [--messages N]. Prints `consumer_msg_s`,
`consumer_raw_msg_s` and `consumer_vs_raw_ratio` (bench/README.md); logs on stderr.

One work queue, declared as a read model's (`messaging.Topology`, service `bench` on an
exchange `bench-consume-<id>` of the run's own, removed afterwards): N events, published as the
relay publishes them (the envelope, `event_properties`, persistent, confirmed), are consumed
alternately by relay_bench's `RawConsumer` (a pika `SelectConnection`, `basic.consume` with
manual `multiple` acks) and by the library's `Consumer` with a handler that does nothing, at the
same prefetch and batch (the runtime's defaults), ROUNDS times each; the best round of each
counts. Both clocks run from `basic.consume` (connection, channel and declarations left out) to
the last message settled.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
from messaging import Consumer, ConsumerSettings
from messaging.publisher import ConfirmedPublisher, Outgoing, PublishError, event_properties
from messaging.topology import DEFAULT_RETRY_DELAYS, Topology
from relay_bench import (
    AMQP_URL,
    RAW_TIMEOUT,
    WINDOW,
    MeasureError,
    RawConsumer,
    broker_channel,
    broker_cleanup,
    interrupted,
    make_envelopes,
)

MESSAGES = 50_000
ROUNDS = 2  # alternating raw and runtime rounds; the best of each counts
POLL_INTERVAL = 0.005  # how often the bench thread looks at the runtime's count (see README)

log = logging.getLogger("bench.consumer")


@contextlib.contextmanager
def work_queue(run_id: str) -> Iterator[Topology]:
    """A read model's queues (work, retries, dead) on an exchange of the run's own; deleted
    afterwards, waiting a while for a broker that went away meanwhile."""
    topology = Topology("bench", f"bench-consume-{run_id}", DEFAULT_RETRY_DELAYS)
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        topology.declare(conn)
    finally:
        conn.close()
    try:
        yield topology
    finally:

        def delete(channel: Any) -> None:
            topology.delete(channel)
            channel.exchange_delete(exchange=topology.exchange)

        broker_cleanup(f"the queues of {topology.exchange}", delete)


def fill(topology: Topology, messages: list[Outgoing]) -> None:
    """Publish the messages to the exchange (confirmed) and check the queue holds them all."""
    publisher = ConfirmedPublisher(AMQP_URL, topology.exchange, "bench-consume", window=WINDOW)
    try:
        publisher.publish_all(messages, timeout=RAW_TIMEOUT)
    except PublishError as exc:
        raise MeasureError(str(exc)) from exc
    waiting = ready(topology)
    if waiting != len(messages):
        raise MeasureError(f"the queue holds {waiting} messages, not {len(messages)}")


def ready(topology: Topology) -> int:
    with broker_channel() as channel:
        return channel.queue_declare(queue=topology.queue, passive=True).method.message_count


def consume_raw(topology: Topology, settings: ConsumerSettings, n: int) -> float:
    """pika alone: the runtime's prefetch, one `multiple` ack per `max_batch` deliveries."""
    return RawConsumer(topology.queue, n, settings.prefetch, settings.max_batch).run()


def consume_runtime(settings: ConsumerSettings, n: int) -> float:
    """The library's Consumer with a handler that does nothing: messages per second from its
    `basic.consume` (it is attached) until it has applied all N. Its acknowledgement of the last
    batch follows on its I/O thread; stopping it settles that batch, and the caller checks the
    queue is empty (an unacknowledged message would be back in it)."""
    consumer = Consumer(settings, lambda _envelope: None)
    thread = threading.Thread(target=consumer.run, name="bench-consumer", daemon=True)
    thread.start()
    try:
        if not consumer.attached.wait(RAW_TIMEOUT):
            raise MeasureError(f"the consumer did not attach within {RAW_TIMEOUT}s")
        start = time.perf_counter()
        while consumer.stats.consumed < n:
            if time.perf_counter() - start > RAW_TIMEOUT:
                raise MeasureError(f"the runtime consumed {consumer.stats.consumed} of {n}")
            time.sleep(POLL_INTERVAL)
        elapsed = time.perf_counter() - start
    finally:
        consumer.stop()
        thread.join(settings.shutdown_timeout + 5)
    stats = consumer.stats
    if stats.connections > 1 or stats.consumed > n:
        raise MeasureError(
            f"the runtime connected {stats.connections} times and consumed {stats.consumed} of "
            f"{n}: the broker went away meanwhile (tests on this machine stop it); run again"
        )
    if stats.dead_lettered or stats.retried or stats.ignored or stats.consumed != n:
        raise MeasureError(
            f"the runtime consumed {stats.consumed} of {n}, retried {stats.retried}, "
            f"dead-lettered {stats.dead_lettered}, ignored {stats.ignored}"
        )
    return n / elapsed


def run(n: int, rounds: int = ROUNDS) -> dict[str, float]:
    run_id = uuid.uuid4().hex[:10]
    messages = [
        Outgoing("", e.to_json(), event_properties(str(e.event_id), e.event_type, None))
        for e in make_envelopes(n)
    ]
    raw: list[float] = []
    runtime: list[float] = []
    with work_queue(run_id) as topology:
        settings = ConsumerSettings(AMQP_URL, topology)
        for _ in range(rounds):
            for kind, rates, consume in (
                ("raw", raw, lambda: consume_raw(topology, settings, n)),
                ("runtime", runtime, lambda: consume_runtime(settings, n)),
            ):
                fill(topology, messages)
                rates.append(consume())
                left = ready(topology)
                if left:
                    raise MeasureError(f"{left} messages left in the queue after the {kind} round")
                log.info("%s: %d messages, %.0f/s", kind, n, rates[-1])
    return {
        "consumer_raw_msg_s": max(raw),
        "consumer_msg_s": max(runtime),
        "consumer_vs_raw_ratio": max(runtime) / max(raw),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print the figures; 1 if they could not be measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=MESSAGES, help=f"default {MESSAGES}")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # failures surface as exceptions
    signal.signal(signal.SIGTERM, interrupted)  # run the clean-ups, as on Ctrl-C
    try:
        figures = run(args.messages)
    except Exception as exc:
        log.error("consumer benchmark: not measured (%s: %s)", type(exc).__name__, exc)
        return 1
    for name in ("consumer_raw_msg_s", "consumer_msg_s"):
        print(f"{name}: {figures[name]:.0f}", flush=True)
    print(f"consumer_vs_raw_ratio: {figures['consumer_vs_raw_ratio']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
