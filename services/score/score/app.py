"""Composition root of the score API."""

from __future__ import annotations

import redis
from flask import Flask
from messaging import StoreUnavailable
from messaging.connection import BrokerProbe
from messaging.replicas import consumer_metrics, replicas_ready
from prometheus_client import CollectorRegistry
from servicekit import access, correlation, docs, errors, health, metrics, tracing, web
from servicekit.metrics import ScrapeCollector

from . import api
from .config import ScoreConfig
from .store import ScoreStore


def create_app(config: ScoreConfig | None = None, store: ScoreStore | None = None) -> Flask:
    config = config or ScoreConfig()
    api_keys = config.api_key_store()  # refuses production without API_KEYS
    app = web.new_app("score")
    if store is None:
        store = ScoreStore.from_url(config.score_redis_url, config.score_key_prefix)
    app.extensions["score.store"] = store

    def consumers_attached() -> None:
        """Each consumer replica beats while attached, with its health or the model's rebuild
        state (replicas_ready says how they add up)."""
        reports = store.beacons()
        replicas_ready(
            {replica: str(report.get("health")) for replica, report in reports.items()},
            none="the score consumer is not attached",
        )

    def consumer_stats() -> dict:
        return {replica: report.get("stats") for replica, report in store.beacons().items()}

    registry = CollectorRegistry()
    registry.register(ScrapeCollector(consumer_stats, consumer_metrics))
    app.register_api(api.bp)
    readiness = {
        "redis": store.write_probe,
        "broker": BrokerProbe(config.amqp_url),
        "consumer": consumers_attached,
    }
    correlation.init_app(app)
    metrics.init_app(app, registry)
    access.init_app(app, "score", api_keys)
    # The store translates a Redis or Redis Cluster that is away or failing over (StoreUnavailable)
    errors.init_app(app, unavailable=(redis.ConnectionError, redis.TimeoutError, StoreUnavailable))
    health.init_app(app, "score", readiness, registry)
    tracing.init_app(app, "score")
    docs.init_app(app)  # last: it documents every route
    return app
