"""Fixtures shared by every test folder: real servers, isolated per test run and per test.

When a Docker engine answers, PostgreSQL, RabbitMQ and Redis run in throwaway containers
(testcontainers); otherwise the tests use the local servers at TEST_DATABASE_URL, TEST_AMQP_URL
and TEST_REDIS_URL (tests/support/backing_servers.py). Each test gets its own database, exchange
and queue names, or Redis key prefix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

# What tests need that is no part of any service lives in tests/support (the servers of the run,
# the fault runs' load and verdict, servers a test starts for itself), on the
# import path of every test folder (pyproject.toml: pythonpath); the development stack's own
# tools (a three-node RabbitMQ cluster, the Procfile's processes, the fake SendGrid and a
# throwaway CA) are the installed `stack`.
from backing_servers import Servers, container_servers, local_servers, use_containers
from hypothesis import HealthCheck, settings
from messaging import Envelope
from messaging.connection import connect
from messaging.replay import requests_queue
from messaging.testing import publish
from messaging.topology import Topology
from own_servers import own_redis
from psycopg import sql
from servicekit import roles
from stack.cluster import SCRIPTS, Cluster
from stack.fake_sendgrid import FakeSendGrid
from stack.pg_pair import PgPair, available

# The Redis Cluster fixtures (redis_cluster, redis_cluster_session): tests/support/redis_cluster.py
pytest_plugins = ["redis_cluster"]

# Every settings object reads .env after the environment, and `make compose-env` writes API keys
# there: a developer's compose keys must not close the routes of tests that build their own
# configuration (those that want keys set them; an empty value means none).
os.environ.setdefault("API_KEYS", "")
os.environ.setdefault("CONSOLE_API_KEY", "")

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


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """The run's PostgreSQL, RabbitMQ and Redis: containers when an engine answers (and
    TEST_USE_CONTAINERS is not `no`), the local servers otherwise (support/backing_servers.py)."""
    if use_containers():
        with container_servers() as started:
            yield started
    else:
        yield local_servers()


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


@pytest.fixture(scope="session")
def db_role(servers: Servers, make_database) -> Iterator[Callable[..., str]]:
    """A service's own database role on a test database, made as the migrate step makes it
    (servicekit.roles): returns the URL the service then uses. Dropped after the run."""
    made: list[tuple[str, str]] = []

    def make(
        url: str, service: str, read_only: str | None = None, append_only: tuple[str, ...] = ()
    ) -> str:
        role = f"test_{service}_{uuid.uuid4().hex[:8]}"
        base, _, database = url.rpartition("/")
        scheme, _, rest = base.partition("://")
        host = rest.rpartition("@")[2]
        role_url = f"{scheme}://{role}:{uuid.uuid4().hex}@{host}/{database}"
        roles.grant(servers.database, role_url, read_only, append_only)
        made.append((role, database))
        return role_url

    yield make
    for role, database in made:
        roles.drop(servers.database, role, [database])


@pytest.fixture(scope="session")
def administrator(servers: Servers) -> Callable[[str], str]:
    """The administrator's URL of a test database, whoever `url` connects as: what a test that
    breaks the database on purpose (read-only, a closed table) or migrates it uses."""

    def admin_of(url: str) -> str:
        return _with_dbname(servers.database, url.rpartition("/")[2])

    return admin_of


@pytest.fixture(scope="session")
def service_url(db_role: Callable[..., str]) -> Callable[..., str]:
    """The URL a service's tests give it for a database the administrator migrated: with
    TEST_DB_ROLES=yes its own role's (so its tests show it works with only that role), else
    the administrator's."""

    def url_for(url: str, service: str, **grants: Any) -> str:
        return db_role(url, service, **grants) if os.environ.get("TEST_DB_ROLES") == "yes" else url

    return url_for


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
        """Publish to the exchange as the relay does (messaging.testing.publish)."""
        publish(self.amqp_url, self.exchange, *envelopes)

    def depth(self, queue: str) -> int:
        """Messages ready in a queue."""
        conn = connect(self.amqp_url, "test-depth")
        try:
            return conn.channel().queue_declare(queue, passive=True).method.message_count
        finally:
            conn.close()


def _remove(space: BrokerSpace) -> None:
    conn = connect(space.amqp_url, "test-cleanup")
    try:
        channel = conn.channel()
        for topology in space.topologies:
            topology.delete(channel)
        channel.queue_delete(requests_queue(space.exchange))
        channel.exchange_delete(space.exchange)
    finally:
        conn.close()


@pytest.fixture
def broker(servers: Servers) -> Iterator[BrokerSpace]:
    space = BrokerSpace(servers.amqp, f"test-{uuid.uuid4().hex[:10]}")
    yield space
    _remove(space)


@pytest.fixture(scope="session")
def cluster_session(request: pytest.FixtureRequest, servers: Servers) -> Iterator[Cluster]:
    """Three clustered RabbitMQ nodes of this run's own (stack/cluster.py), started by the
    first test that asks and removed at the end of the session: no node is left running and
    their directory is deleted, whatever the tests did."""
    if not (SCRIPTS / "rabbitmq-server").exists():
        pytest.skip(f"the cluster tests start RabbitMQ nodes from {SCRIPTS}: not installed here")
    if servers.where == "containers" and "cluster" not in (request.config.option.markexpr or ""):
        # Their broker is their own nodes, never the run's: a containers pass would only repeat
        # them (about 3 minutes). The local-servers pass runs them, as does `pytest -m cluster`.
        pytest.skip("the cluster tests run against the local servers (TEST_USE_CONTAINERS=no)")
    with Cluster() as cluster:
        yield cluster


@pytest.fixture
def rabbit_cluster(cluster_session: Cluster) -> Iterator[Cluster]:
    """The cluster; every node a test killed or stopped runs again after it."""
    yield cluster_session
    cluster_session.heal()


@pytest.fixture
def cluster_broker(rabbit_cluster: Cluster) -> Iterator[BrokerSpace]:
    """An exchange of this test's own on the cluster (AMQP_URL lists the three nodes)."""
    space = BrokerSpace(rabbit_cluster.amqp_url, f"test-{uuid.uuid4().hex[:10]}")
    yield space
    # Every node first: deleting a quorum queue waits seconds for each member that is down.
    rabbit_cluster.heal()
    _remove(space)


@pytest.fixture(scope="module")
def pg_pair(request: pytest.FixtureRequest, servers: Servers) -> Iterator[PgPair]:
    """A PostgreSQL primary and a synchronous standby of this module's own (stack/pg_pair.py:
    initdb and pg_basebackup as the `postgres` user, on free ports, in a temporary directory),
    stopped and deleted after the module, whatever the tests did. The system cluster is never
    touched."""
    why = available()
    if why is not None:
        pytest.skip(f"the failover tests start PostgreSQL servers of their own: {why}")
    if servers.where == "containers" and "cluster" not in (request.config.option.markexpr or ""):
        pytest.skip("the failover tests run against the local servers (TEST_USE_CONTAINERS=no)")
    with PgPair() as pair:
        yield pair


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
def private_redis() -> Iterator[str]:
    """A Redis of this test's own (its URL), for tests that reconfigure it: the shared one is
    never touched."""
    with own_redis() as url:
        yield url


@pytest.fixture
def fake_sendgrid() -> Iterator[FakeSendGrid]:
    """A fake SendGrid API on a free port (tests/support), accepting every message."""
    fake = FakeSendGrid().start()
    yield fake
    fake.stop()


SPEED_MARKERS = {"unit", "integration", "e2e", "faults", "cluster"}
# The modules whose tests run on this run's own RabbitMQ cluster (cluster_session): its nodes have
# fixed names (c1..c3@localhost), so they run one after the other on one worker.
CLUSTER_MODULES = {"shared/messaging/tests/test_cluster.py", "tests/e2e/test_cluster_fault_run.py"}


def pytest_collection_modifyitems(config, items) -> None:
    """Every test says how fast it is (make unit selects by it): refuse to run one that does not.
    Side by side (make test), the whole-stack modules go first: they are the longest."""
    unmarked = [
        item.nodeid for item in items if not SPEED_MARKERS & {m.name for m in item.iter_markers()}
    ]
    if unmarked:
        raise pytest.UsageError(
            f"tests without a speed marker ({', '.join(sorted(SPEED_MARKERS))}): "
            + ", ".join(unmarked[:20])
        )
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: not item.nodeid.startswith("tests/e2e/"))


def pytest_xdist_make_scheduler(config, log):
    """make test runs the tests side by side (pytest-xdist): each test module on one worker, so a
    module's stack is started once, and the RabbitMQ cluster's modules on the same one."""
    from xdist.scheduler import LoadFileScheduling

    class ByModule(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "rabbitmq-cluster" if module in CLUSTER_MODULES else module

    return ByModule(config, log)
