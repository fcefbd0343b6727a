"""Fixtures of the messaging library's own tests."""

from __future__ import annotations

import psycopg
import pytest
from messaging.outbox import install


@pytest.fixture
def producer_db(make_database) -> str:
    """A fresh database with the outbox installed, as a producer's migrations would leave it."""
    url = make_database("producer")
    with psycopg.connect(url) as conn:
        install(conn)
    return url


@pytest.fixture
def restartable_broker(servers):
    """The run's RabbitMQ, which the test may stop (servers.broker); it runs again afterwards."""
    yield servers.broker
    servers.broker.ensure_running()
