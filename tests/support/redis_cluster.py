"""Fixtures of the Redis Cluster tests: a cluster of the run's own beside the shared Redis.

Three masters and a replica each, from Debian's redis-server (stack/redis_cluster.py), started by
the first test that asks and removed at the end of the session: no node is left running and
their directory is deleted, whatever the tests did. Each test gets it whole again (every node
running, every replica in sync), and its keys under a prefix of its own. The root conftest.py
registers these fixtures (pytest_plugins).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from stack.redis_cluster import LocalRedisCluster


@pytest.fixture(scope="session")
def redis_cluster_session(request: pytest.FixtureRequest, servers) -> Iterator[LocalRedisCluster]:
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.skip("the Redis Cluster tests start redis-server: not installed here")
    if servers.where == "containers" and "cluster" not in (request.config.option.markexpr or ""):
        # The cluster is their own nodes, never the run's: a containers pass would only repeat
        # them. The local-servers pass runs them, as does `pytest -m cluster`.
        pytest.skip("the Redis Cluster tests run against the local servers")
    with LocalRedisCluster() as cluster:
        yield cluster


@pytest.fixture
def redis_cluster(redis_cluster_session: LocalRedisCluster) -> Iterator[LocalRedisCluster]:
    """The cluster; every node a test killed runs again after it, in sync."""
    yield redis_cluster_session
    redis_cluster_session.heal()
