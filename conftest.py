"""Fixtures shared by every test folder: real servers, isolated per test run and per test.

When a Docker engine answers, PostgreSQL, RabbitMQ and Redis run in throwaway containers
(testcontainers); otherwise the tests use the local servers at TEST_DATABASE_URL, TEST_AMQP_URL
and TEST_REDIS_URL. Each test gets its own database, exchange and queue names, or Redis database.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pika
import psycopg
import pytest
from hypothesis import HealthCheck, settings
from messaging import Envelope
from messaging.replay import requests_queue
from messaging.topology import Topology
from psycopg import sql

# Test doubles that are no part of any service (the fake SendGrid): importable by every test.
sys.path.insert(0, str(Path(__file__).resolve().parent / "tests" / "support"))
from fake_sendgrid import FakeSendGrid

# Generated tests (hypothesis): a bounded, reproducible number of examples in make test, many more
# in make soak (HYPOTHESIS_PROFILE=soak), where each run explores new ones.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "suite",
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    report_multiple_bugs=False,
    suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "soak", max_examples=2000, stateful_step_count=80, deadline=None, suppress_health_check=_SLOW_OK
)

LOCAL = {
    "database": "postgresql://postgres@127.0.0.1:5432/postgres",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/%2F",
    "redis": "redis://127.0.0.1:6379/0",
}


@dataclass(frozen=True)
class Servers:
    database: str  # an admin URL; tests create their own databases through it
    amqp: str
    redis: str


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _containers() -> Iterator[Servers]:
    from testcontainers.postgres import PostgresContainer
    from testcontainers.rabbitmq import RabbitMqContainer
    from testcontainers.redis import RedisContainer

    with (
        PostgresContainer("postgres:15-alpine", driver=None) as pg,
        RabbitMqContainer("rabbitmq:3.13-management-alpine") as mq,
        RedisContainer("redis:7-alpine") as rd,
    ):
        host, port = mq.get_container_host_ip(), mq.get_exposed_port(5672)
        yield Servers(
            database=pg.get_connection_url(),
            amqp=f"amqp://guest:guest@{host}:{port}/%2F",
            redis=f"redis://{rd.get_container_host_ip()}:{rd.get_exposed_port(6379)}/0",
        )


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    if os.environ.get("TEST_USE_CONTAINERS", "auto") != "no" and _docker_answers():
        with _containers() as found:
            yield found
        return
    yield Servers(
        database=os.environ.get("TEST_DATABASE_URL", LOCAL["database"]),
        amqp=os.environ.get("TEST_AMQP_URL", LOCAL["amqp"]),
        redis=os.environ.get("TEST_REDIS_URL", LOCAL["redis"]),
    )


def _with_dbname(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def make_database(servers: Servers) -> Iterator:
    """Create a fresh, empty database and return its URL; all are dropped after the run."""
    created: list[str] = []

    def make(prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(servers.database, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created.append(name)
        return _with_dbname(servers.database, name)

    yield make
    with psycopg.connect(servers.database, autocommit=True) as admin:
        for name in created:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@dataclass
class BrokerSpace:
    """An exchange of this test's own; every topology made through it is deleted afterwards."""

    amqp_url: str
    exchange: str
    topologies: list[Topology] = field(default_factory=list)

    def topology(self, service: str, retry_delays: tuple[float, ...] = (0.2, 0.4)) -> Topology:
        made = Topology(service=service, exchange=self.exchange, retry_delays=retry_delays)
        self.topologies.append(made)
        return made

    def publish(self, *envelopes: Envelope) -> None:
        """Publish to the exchange as the relay does (persistent, mandatory), with confirms."""
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            channel = conn.channel()
            channel.confirm_delivery()
            for envelope in envelopes:
                channel.basic_publish(
                    self.exchange,
                    "",
                    envelope.to_json(),
                    pika.BasicProperties(message_id=str(envelope.event_id), delivery_mode=2),
                    mandatory=True,
                )
        finally:
            conn.close()

    def depth(self, queue: str) -> int:
        """Messages ready in a queue."""
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            return conn.channel().queue_declare(queue, passive=True).method.message_count
        finally:
            conn.close()


@pytest.fixture
def broker(servers: Servers) -> Iterator[BrokerSpace]:
    space = BrokerSpace(servers.amqp, f"test-{uuid.uuid4().hex[:10]}")
    yield space
    conn = pika.BlockingConnection(pika.URLParameters(servers.amqp))
    try:
        channel = conn.channel()
        for topology in space.topologies:
            topology.delete(channel)
        channel.queue_delete(requests_queue(space.exchange))
        channel.exchange_delete(space.exchange)
    finally:
        conn.close()


@pytest.fixture
def person_event() -> Callable[..., Envelope]:
    """Builds the person service's person events as the notifier and score receive them."""

    def build(
        cpf: str,
        version: int = 1,
        change: str = "created",
        *,
        name: str = "Ana",
        email: str | None = "ana@example.com",
        status: str = "pending",
        created_at: str | None = None,
    ) -> Envelope:
        at = created_at or datetime.now(UTC).isoformat()
        data = None
        if change != "deleted":
            data = {
                "cpf": cpf,
                "name": name,
                "address": "Rua da Aurora, 1, Recife",
                "date_of_birth": "1990-01-01",
                "email": email,
                "status": status,
                "created_at": at,
                "updated_at": at,
            }
        return Envelope.new(
            event_type=f"person.{change}",
            entity_id=cpf,
            entity_version=version,
            data=data,
            producer="person",
        )

    return build


@pytest.fixture
def fake_sendgrid() -> Iterator[FakeSendGrid]:
    """A fake SendGrid API on a free port (notifier.fake_sendgrid), accepting every message."""
    fake = FakeSendGrid().start()
    yield fake
    fake.stop()


SPEED_MARKERS = {"unit", "integration", "e2e", "faults", "cluster"}


def pytest_collection_modifyitems(config, items) -> None:
    """Every test says how fast it is (make unit selects by it): refuse to run one that does not."""
    unmarked = [
        item.nodeid for item in items if not SPEED_MARKERS & {m.name for m in item.iter_markers()}
    ]
    if unmarked:
        raise pytest.UsageError(
            f"tests without a speed marker ({', '.join(sorted(SPEED_MARKERS))}): "
            + ", ".join(unmarked[:20])
        )
