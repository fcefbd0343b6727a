"""Fixtures of the cross-service tests: every service's store on its own fresh database."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import pika
import pytest
import redis
from messaging.replay import requests_queue
from messaging.topology import Topology
from notifier.migrate import migrate_database as migrate_notifier
from person.migrate import migrate_database as migrate_person
from stack.processes import free_port


@pytest.fixture
def person_db(make_database) -> str:
    url = make_database("person")
    migrate_person(url)
    return url


@pytest.fixture
def notifier_db(make_database) -> str:
    url = make_database("notifier")
    migrate_notifier(url)
    return url


@pytest.fixture(scope="module")
def stack_env(make_database, servers) -> Iterator[dict[str, str]]:
    """Environment for a whole stack of this module's own: ports, databases, exchange, Redis prefix.

    It never meets a stack a developer started with `make up`. The queues the stack declared are
    deleted afterwards.
    """
    exchange = f"stack-{uuid.uuid4().hex[:8]}"
    delays = (1.0, 5.0, 30.0)
    env = {
        **os.environ,
        "GATEWAY_PORT": str(free_port()),
        "PERSON_PORT": str(free_port()),
        "SCORE_PORT": str(free_port()),
        "NOTIFIER_PORT": str(free_port()),
        "CONSOLE_PORT": str(free_port()),
        "PERSON_DATABASE_URL": make_database("stack_person"),
        "NOTIFIER_DATABASE_URL": make_database("stack_notifier"),
        "CONSOLE_DATABASE_URL": make_database("stack_console"),
        "SCORE_REDIS_URL": servers.redis,
        "SCORE_KEY_PREFIX": f"{exchange}:",
        "AMQP_URL": servers.amqp,
        "EVENTS_EXCHANGE": exchange,
        "RETRY_DELAYS": json.dumps(delays),
        "ACTIVATION_SECRET": "stack-secret",
        # The run's own servers, never a container make up would start in their place.
        "STACK_SERVERS": "local",
        # The tests send far more than a person would: limits that never get in their way
        # (tests/e2e/test_security_production.py checks the limit itself).
        "RATE_LIMIT_AVERAGE": "100000",
        "RATE_LIMIT_BURST": "100000",
        "ACTIVATION_RESEND_SECONDS": "0",
        # Tests rebuild and heal a model again and again, seconds apart.
        "REPLAY_MIN_INTERVAL_SECONDS": "1",
        # and verify each read model every few seconds: the checks run beside every e2e test
        "VERIFY_SECONDS": "5",
        "PERSON_WORKERS": "1",
        "SCORE_WORKERS": "1",
        "NOTIFIER_WORKERS": "1",
        "CONSOLE_WORKERS": "1",
    }
    env.pop("SENDGRID_API_KEY", None)
    yield env
    client = redis.Redis.from_url(servers.redis)
    for key in client.scan_iter(match=f"{exchange}:*", count=1000):
        client.unlink(key)
    conn = pika.BlockingConnection(pika.URLParameters(servers.amqp))
    try:
        channel = conn.channel()
        for service in ("score", "notifier"):
            Topology(service, exchange, delays).delete(channel)
        channel.queue_delete(requests_queue(exchange))
        channel.exchange_delete(exchange)
    finally:
        conn.close()
