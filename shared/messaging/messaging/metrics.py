"""Prometheus metrics an API process exports for the consumer of its service.

The consumer runs in its own process; its beacon (runner.AttachedBeacon) writes
`ConsumerStats.snapshot()` where the API can read it (a Redis key, a table row), and
`ScrapeCollector(read, consumer_metrics)` turns the latest snapshot into metrics at scrape time;
`ScrapeCollector` serves any other figure an API reads from its store when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def consumer_metrics(snap: dict[str, Any]) -> Iterator[Metric]:
    """The metric families of one ConsumerStats snapshot."""
    if not snap:
        return
    messages = CounterMetricFamily(
        "consumer_messages", "Messages the consumer settled, by outcome", labels=["outcome"]
    )
    messages.add_metric(["applied"], snap["consumed"])
    messages.add_metric(["retried"], snap["retried"])
    messages.add_metric(["dead_lettered"], snap["dead_lettered"])
    messages.add_metric(["ignored"], snap.get("ignored", 0))
    yield messages
    yield CounterMetricFamily(
        "consumer_connections", "Broker connections made", value=snap["connections"]
    )
    cumulative, buckets = 0, []
    for bound, count in zip(
        [*snap["handler_buckets"], float("inf")], snap["handler_counts"], strict=True
    ):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    yield HistogramMetricFamily(
        "consumer_handler_seconds",
        "Time in the handler per call (one message, or a batch)",
        buckets=buckets,
        sum_value=snap["handler_seconds"],
    )
    if snap.get("last_occurred_at"):
        last = datetime.fromisoformat(snap["last_occurred_at"])
        yield GaugeMetricFamily(
            "read_model_lag_seconds",
            "Now minus occurred_at of the last event applied",
            value=max(0.0, (datetime.now(UTC) - last).total_seconds()),
        )
