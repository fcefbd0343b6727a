"""Composition root of the person API: create_app builds the pool, the store and the routes."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
from flask import Flask
from messaging.connection import BrokerProbe
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from psycopg_pool import PoolTimeout
from servicekit import access, correlation, docs, errors, health, metrics, tracing, web
from servicekit.database import connection_pool
from servicekit.metrics import ScrapeCollector

from . import api, catalogue
from .activation import Tokens
from .config import PersonConfig
from .imports import ImportStore
from .service import Store
from .store import PgStore


def create_app(config: PersonConfig | None = None, store: Store | None = None) -> Flask:
    """Build the app; tests pass their own config and store (memory.MemoryStore)."""
    tracing.configure("person")  # before any pool connects: its connections are traced
    config = config or PersonConfig()
    api_keys = config.api_key_store()  # refuses production without API_KEYS
    app = web.new_app("person")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["BULK_MAX_BYTES"] = config.bulk_max_bytes  # POST /person/bulk's own limit
    app.config["BULK_MAX_ITEMS"] = config.bulk_max_items
    app.config["ACTIVATION_RESEND_SECONDS"] = config.activation_resend_seconds
    app.config["ACTIVATION_REQUESTS_PER_KEY"] = config.activation_requests_per_key_per_day
    if store is None:
        # A database that does not answer is a 503 in 5 s, not a hung request; after a failover
        # the pool finds the new primary (servicekit.database).
        pool = connection_pool(config.person_database_url, "person", config.db_pool_size)
        store = PgStore(pool, config.items_per_person_max)
    store.items_per_person_max = config.items_per_person_max  # a test's store too
    app.extensions["person.store"] = store
    if isinstance(store, PgStore):  # bulk registration lives in PostgreSQL only
        app.extensions["person.imports"] = ImportStore(store.pool, config.imports_queued_per_key)
    app.extensions["person.asyncapi"] = catalogue.document(config.events_exchange)
    app.extensions["person.tokens"] = Tokens(
        config.activation_secret, config.activation_ttl_seconds
    )

    registry = CollectorRegistry()
    registry.register(ScrapeCollector(store.outbox_backlog, _backlog_metrics))
    registry.register(ScrapeCollector(store.outbox_published, _published_metrics))
    app.register_api(api.bp)
    readiness = {"database": store.ping, "broker": BrokerProbe(config.amqp_url)}
    correlation.init_app(app)
    metrics.init_app(app, registry)
    access.init_app(app, "person", api_keys)
    errors.init_app(app, unavailable=(psycopg.OperationalError, PoolTimeout))
    api.init_app(app)
    health.init_app(app, "person", readiness, registry)
    tracing.init_app(app, "person")
    docs.init_app(app)  # last: it documents every route
    return app


def _backlog_metrics(values: tuple[int, float, int]) -> Iterator[Metric]:
    """Outbox backlog, the age of its oldest event and the parked rows, read at scrape time."""
    backlog, oldest, parked = values
    yield GaugeMetricFamily("outbox_backlog", "Events not yet published", value=backlog)
    yield GaugeMetricFamily(
        "outbox_oldest_age_seconds", "Age of the oldest unpublished event", value=oldest
    )
    yield GaugeMetricFamily(
        "outbox_parked", "Outbox rows the broker could not take, set aside", value=parked
    )


def _published_metrics(values: tuple[int, float | None]) -> Iterator[Metric]:
    """What the relay published (its mark statement counts), read at scrape time."""
    published, last = values
    yield CounterMetricFamily(
        "outbox_published", "Events the relay published (confirmed)", value=published
    )
    if last is not None:
        yield GaugeMetricFamily(
            "outbox_last_published_timestamp_seconds", "When the relay last published", last
        )
