"""Composition root of the score API."""

from __future__ import annotations

import json

import redis
from flask import Flask
from messaging import web
from messaging.connection import BrokerProbe
from messaging.metrics import ScrapeCollector, consumer_metrics
from prometheus_client import CollectorRegistry

from . import api
from .config import ScoreConfig
from .consumer import HEARTBEAT_KEY, STATS_KEY
from .store import ScoreStore


def create_app(config: ScoreConfig | None = None, store: ScoreStore | None = None) -> Flask:
    config = config or ScoreConfig()
    api_keys = config.api_key_store()  # refuses production without API_KEYS
    app = Flask("score")
    if store is None:
        store = ScoreStore(redis.Redis.from_url(config.score_redis_url), config.score_key_prefix)
    app.extensions["score.store"] = store

    def consumer_attached() -> None:
        """The consumer beats while attached, with its health or the model's rebuild state."""
        health = store.client.get(f"{store.prefix}{HEARTBEAT_KEY}")
        if health is None:
            raise web.NotReady("the score consumer is not attached")
        if health in (b"rebuilding", b"wiping"):
            raise web.Rebuilding(health.decode())
        if health != b"ok":
            raise web.NotReady(health.decode(errors="replace"))

    def consumer_stats() -> dict | None:
        raw = store.client.get(f"{store.prefix}{STATS_KEY}")
        return json.loads(raw) if raw else None

    registry = CollectorRegistry()
    registry.register(ScrapeCollector(consumer_stats, consumer_metrics))
    openapi = web.OpenApi("score")
    api.describe(openapi)
    app.register_blueprint(api.bp)
    web.install(
        app,
        service="score",
        readiness={
            "redis": store.ping,
            "broker": BrokerProbe(config.amqp_url),
            "consumer": consumer_attached,
        },
        openapi=openapi.document(),
        registry=registry,
        api_keys=api_keys,
    )
    return app
