"""Fixtures of the messaging library's own tests."""

from __future__ import annotations

import subprocess

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
def local_broker(servers):
    """The local RabbitMQ node, which tests may stop; it is always started again."""
    if "127.0.0.1" not in servers.amqp and "localhost" not in servers.amqp:
        pytest.skip("broker restarts need the local RabbitMQ node")
    yield
    subprocess.run(["rabbitmqctl", "-q", "start_app"], check=False, capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, timeout=120)
