"""Composition root of the notifier API."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
from flask import Flask
from messaging.connection import BrokerProbe
from messaging.replicas import consumer_metrics, replicas_ready
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from psycopg_pool import PoolTimeout
from servicekit import access, correlation, docs, errors, health, metrics, tracing, web
from servicekit.database import connection_pool
from servicekit.metrics import ScrapeCollector

from . import api
from .config import NotifierConfig
from .consumer import HEARTBEAT, HEARTBEAT_SECONDS
from .sender import HEARTBEAT as SENDER_HEARTBEAT
from .store import NotifierStore


def create_app(config: NotifierConfig | None = None, store: NotifierStore | None = None) -> Flask:
    tracing.configure("notifier")  # before any pool connects: its connections are traced
    config = config or NotifierConfig()
    api_keys = config.api_key_store()  # refuses production without API_KEYS
    app = web.new_app("notifier")
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024
    app.config["MAILBOX_OPEN"] = config.mailbox_open
    app.config["NOTIFIER_URL"] = config.notifier_url
    if store is None:
        # A database that does not answer is a 503 in 5 s, not a hung request; after a failover
        # the pool finds the new primary (servicekit.database).
        pool = connection_pool(config.notifier_database_url, "notifier", config.db_pool_size)
        store = NotifierStore(pool)
    app.extensions["notifier.store"] = store

    def reports(process: str) -> dict[str, dict]:
        """What each replica of a process reported with its last beat, if within 5 beats."""
        return store.reports(process, within_seconds=HEARTBEAT_SECONDS * 5)

    def beating(process: str, none: str) -> None:
        """Replicas beat every few seconds with their health (replicas_ready adds them up)."""
        healths = {r: str(report.get("health", "ok")) for r, report in reports(process).items()}
        replicas_ready(healths, none=none)

    registry = CollectorRegistry()
    registry.register(ScrapeCollector(lambda: reports(HEARTBEAT), consumer_metrics))
    registry.register(ScrapeCollector(store.delivery_counts, _email_metrics))
    app.register_api(api.bp)
    readiness = {
        "database": store.write_probe,
        "broker": BrokerProbe(config.amqp_url),
        "consumer": lambda: beating(
            HEARTBEAT, "the notifier consumer is not running (or not attached)"
        ),
        "sender": lambda: beating(SENDER_HEARTBEAT, "the e-mail sender is not running"),
    }
    correlation.init_app(app)
    metrics.init_app(app, registry)
    access.init_app(app, "notifier", api_keys)
    errors.init_app(app, unavailable=(psycopg.OperationalError, PoolTimeout))
    health.init_app(app, "notifier", readiness, registry)
    tracing.init_app(app, "notifier")
    docs.init_app(app)  # last: it documents every route
    return app


def _email_metrics(counts: dict[str, int]) -> Iterator[Metric]:
    """E-mail deliveries by status, read from the ledger at scrape time."""
    family = GaugeMetricFamily("emails", "E-mail deliveries by status", labels=["status"])
    for status in ("pending", "sending", "sent", "failed", "cancelled", "suppressed"):
        family.add_metric([status], counts.get(status, 0))
    yield family
