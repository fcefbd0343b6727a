"""What a consumer's replicas report, and how an API adds their reports up.

A consumer runs in processes of its own, possibly several replicas. Each one's beacon
(`AttachedBeacon`) writes its health and `ConsumerStats.snapshot()` where the model's API can
read it (a Redis key, a table row). `replicas_ready` turns the healths into one readiness
answer, and `consumer_metrics` turns the latest snapshot of every replica into metrics at scrape
time, one series per replica (label `replica`: a replica's counters start at 0 when it starts,
which Prometheus reads as a counter reset; a sum over replicas would drop when one goes away).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from servicekit.readiness import NotReady, Rebuilding

from .healing import REBUILDING, WIPING

HEALTHY = "ok"
REBUILD_STATES = (REBUILDING, WIPING)  # what a consumer reports while its read model is rebuilt


def replicas_ready(healths: Mapping[str, str], none: str) -> None:
    """Readiness of one process type run as several replicas, from each one's last report.

    Ready when at least one replica reports and every replica that reports is healthy: a
    stalled or paused replica holds its prefetched messages back from the others, so it is
    reported (with its id) until it recovers or dies. A replica that stopped reporting (gone,
    or reconnecting to the broker) does not count. A rebuild, which concerns the read model
    all replicas share, answers Rebuilding. `none` is the reason given when no replica reports.
    """
    if not healths:
        raise NotReady(none)
    unwell = sorted(
        (health, replica)
        for replica, health in healths.items()
        if health != HEALTHY and health not in REBUILD_STATES
    )
    if unwell:
        raise NotReady("; ".join(f"{health} ({replica})" for health, replica in unwell))
    states = set(healths.values())
    for state in (WIPING, REBUILDING):  # the earlier step of a rebuild first
        if state in states:
            raise Rebuilding(state)


class AttachedBeacon:
    """Tells an API process that this consumer is attached to its queue.

    While `consumer.attached` is set, `beat()` is called at once and then every `every` seconds;
    the API's /ready treats a beat older than a few intervals as "not attached". `beat` writes
    wherever the API can read it (a Redis key, a table row); its errors are logged and retried,
    since a missing beat is what readiness reports.
    """

    def __init__(self, consumer: Any, beat: Callable[[], None], every: float = 2.0) -> None:
        self.consumer, self.beat, self.every = consumer, beat, every
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="attached-beacon", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.consumer.attached.wait(timeout=self.every):
                try:
                    self.beat()
                except Exception as exc:  # readiness reports the missing beat
                    logging.getLogger("messaging.replicas").warning("beacon beat failed: %s", exc)
                self._stop.wait(self.every)


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
    yield from _verification_metrics(snaps)


def _verification_metrics(snaps: Mapping[str, dict[str, Any]]) -> Iterator[Metric]:
    """What each replica's verifications found (messaging.verification), if it verifies."""
    verifying = {r: s for r, s in snaps.items() if "verifications" in s}
    if not verifying:
        return
    divergent = GaugeMetricFamily(
        "read_model_divergent_buckets",
        "Buckets whose digest differed from the producer's at the replica's last check",
        labels=["replica"],
    )
    unrepaired = GaugeMetricFamily(
        "read_model_unrepaired_buckets",
        "Of those, buckets that still differed after a repair replay",
        labels=["replica"],
    )
    skipped = GaugeMetricFamily(
        "read_model_skipped_buckets",
        "Buckets the replica's last check left out: events applied during it touched them",
        labels=["replica"],
    )
    abandoned = CounterMetricFamily(
        "read_model_verifications_abandoned",
        "Checks dropped before their end: the store failed during the walk, or the model healed",
        labels=["replica"],
    )
    repairs = CounterMetricFamily(
        "read_model_repairs",
        "Repair replays asked for (a bucket that differed two checks in a row)",
        labels=["replica"],
    )
    checks = CounterMetricFamily(
        "read_model_verifications", "Verifications the replica made", labels=["replica"]
    )
    verified = GaugeMetricFamily(
        "read_model_last_verified_seconds",
        "When the replica last compared its model with the producer (epoch seconds)",
        labels=["replica"],
    )
    for replica, snap in sorted(verifying.items()):
        divergent.add_metric([replica], snap["divergent_buckets"])
        unrepaired.add_metric([replica], snap.get("unrepaired_buckets", 0))
        skipped.add_metric([replica], snap.get("skipped_buckets", 0))
        abandoned.add_metric([replica], snap.get("abandoned_verifications", 0))
        repairs.add_metric([replica], snap["repairs"])
        checks.add_metric([replica], snap["verifications"])
        if snap.get("last_verified_at"):
            verified.add_metric([replica], snap["last_verified_at"])
    yield from (divergent, unrepaired, skipped, abandoned, repairs, checks)
    if verified.samples:
        yield verified
