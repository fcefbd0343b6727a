"""`python -m stack.redis_cluster`: the Redis Cluster of the README's recipe starts beside the
system Redis, says its SCORE_REDIS_URL, serves every slot, and `stop` leaves nothing behind."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from messaging.stores import redis_client
from stack.cluster import process_alive
from stack.redis_cluster import LocalRedisCluster

pytestmark = pytest.mark.cluster


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stack.redis_cluster", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")
def test_the_command_starts_a_cluster_that_serves_every_slot_and_stop_leaves_nothing(tmp_path):
    folder, pids = tmp_path / "cluster", []
    started = cli("start", "--dir", str(folder))
    try:
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip().removeprefix("SCORE_REDIS_URL=")
        assert url.startswith("redis+cluster://") and url.count(",") == 5
        client = redis_client(url)
        client.set("{probe}key", "1")  # any slot: the cluster serves all
        assert client.get("{probe}key") == b"1"
        client.close()
        status = cli("status", "--dir", str(folder)).stdout
        assert status.count(", master,") == 3 and status.count(", replica,") == 3, status
        assert cli("start", "--dir", str(folder)).returncode == 1  # one at a time
        pids = [node.pid() for node in LocalRedisCluster.load(folder).nodes.values()]
        assert all(pid and process_alive(pid) for pid in pids)
    finally:
        stopped = cli("stop", "--dir", str(folder))
    assert stopped.returncode == 0, stopped.stderr
    assert not folder.exists()
    assert not any(process_alive(pid) for pid in pids if pid)
