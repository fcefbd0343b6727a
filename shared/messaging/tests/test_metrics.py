"""ScrapeCollector and the consumer's metrics, through a real prometheus registry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from messaging.consumer import ConsumerStats
from messaging.replicas import consumer_metrics
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from servicekit.metrics import ScrapeCollector

pytestmark = pytest.mark.unit


def scrape(collector: ScrapeCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def gauge(value: int):
    yield GaugeMetricFamily("things", "Things", value=value)


def test_values_are_read_at_each_scrape():
    values = iter([1, 2])
    collector = ScrapeCollector(lambda: next(values), gauge)
    assert "things 1.0" in scrape(collector)
    assert "things 2.0" in scrape(collector)


def test_a_store_that_does_not_answer_makes_the_metrics_go_quiet_not_fail():
    def down() -> int:
        raise ConnectionError("the database is down")

    assert "things" not in scrape(ScrapeCollector(down, gauge))
    assert "things" not in scrape(ScrapeCollector(lambda: None, gauge))


def test_a_consumer_snapshot_becomes_counters_and_a_cumulative_histogram():
    stats = ConsumerStats()
    stats.observe(0.002, 10)
    stats.observe(0.2, 500)
    stats.retried = 3
    text = scrape(ScrapeCollector(lambda: {"h:1": stats.snapshot()}, consumer_metrics))
    assert 'consumer_messages_total{outcome="applied",replica="h:1"} 510.0' in text
    assert 'consumer_messages_total{outcome="retried",replica="h:1"} 3.0' in text
    assert 'consumer_handler_seconds_bucket{le="0.0025",replica="h:1"} 1.0' in text
    assert 'consumer_handler_seconds_bucket{le="0.25",replica="h:1"} 2.0' in text
    assert 'consumer_handler_seconds_bucket{le="+Inf",replica="h:1"} 2.0' in text
    assert "read_model_lag_seconds" not in text  # nothing applied with a time yet


def test_each_replica_has_series_of_its_own():
    first, second = ConsumerStats(), ConsumerStats()
    first.observe(0.001, 7)
    second.observe(0.001, 5)
    second.last_occurred_at = datetime.now(UTC) - timedelta(seconds=30)
    text = scrape(
        ScrapeCollector(
            lambda: {"h:1": first.snapshot(), "h:2": second.snapshot()}, consumer_metrics
        )
    )
    assert 'consumer_messages_total{outcome="applied",replica="h:1"} 7.0' in text
    assert 'consumer_messages_total{outcome="applied",replica="h:2"} 5.0' in text
    [lag] = [line for line in text.splitlines() if line.startswith("read_model_lag_seconds{")]
    assert 'replica="h:2"' in lag and 29 < float(lag.split()[-1]) < 60
