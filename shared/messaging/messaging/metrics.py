"""Prometheus metrics an API process exports for the consumer of its service.

The consumer runs in processes of its own, possibly several replicas; each one's beacon
(runner.AttachedBeacon) writes its `ConsumerStats.snapshot()` where the API can read it (a Redis
key, a table row), and `ScrapeCollector(read, consumer_metrics)` turns the latest snapshot of
every replica into metrics at scrape time, one series per replica (label `replica`: a replica's
counters start at 0 when it starts, which Prometheus reads as a counter reset; a sum over
replicas would drop when one goes away). `ScrapeCollector` also serves any other figure an API
reads from its store when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)


class ScrapeCollector:
    """Metrics read at scrape time: `read()` fetches values from a store, `build(values)` turns
    them into metric families. A store that does not answer yields nothing (its API's /ready
    says why), and neither does a `read()` that returns None."""

    def __init__(self, read: Callable[[], Any], build: Callable[[Any], Iterator[Metric]]) -> None:
        self.read, self.build = read, build

    def collect(self) -> Iterator[Metric]:
        try:
            values = self.read()
        except Exception:
            return
        if values is not None:
            yield from self.build(values)


def consumer_metrics(snaps: Mapping[str, dict[str, Any]]) -> Iterator[Metric]:
    """The metric families of the ConsumerStats snapshots of each replica (replica → snapshot)."""
    snaps = {replica: snap for replica, snap in snaps.items() if snap}
    if not snaps:
        return
    messages = CounterMetricFamily(
        "consumer_messages",
        "Messages the consumer settled, by outcome",
        labels=["outcome", "replica"],
    )
    connections = CounterMetricFamily(
        "consumer_connections", "Broker connections made", labels=["replica"]
    )
    handler = HistogramMetricFamily(
        "consumer_handler_seconds",
        "Time in the handler per call (one message, or a batch)",
        labels=["replica"],
    )
    lag = GaugeMetricFamily(
        "read_model_lag_seconds",
        "Now minus occurred_at of the last event the replica applied",
        labels=["replica"],
    )
    now = datetime.now(UTC)
    for replica, snap in sorted(snaps.items()):
        messages.add_metric(["applied", replica], snap["consumed"])
        messages.add_metric(["retried", replica], snap["retried"])
        messages.add_metric(["dead_lettered", replica], snap["dead_lettered"])
        messages.add_metric(["ignored", replica], snap.get("ignored", 0))
        connections.add_metric([replica], snap["connections"])
        cumulative, buckets = 0, []
        for bound, count in zip(
            [*snap["handler_buckets"], float("inf")], snap["handler_counts"], strict=True
        ):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        handler.add_metric([replica], buckets, snap["handler_seconds"])
        if snap.get("last_occurred_at"):
            last = datetime.fromisoformat(snap["last_occurred_at"])
            lag.add_metric([replica], max(0.0, (now - last).total_seconds()))
    yield from (messages, connections, handler)
    if lag.samples:
        yield lag
