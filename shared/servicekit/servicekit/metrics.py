"""Metrics read at scrape time: a process exports figures it reads from a store (an outbox's
backlog, the last reports of a consumer's replicas) when Prometheus asks, not as it goes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
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
