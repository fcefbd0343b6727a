"""How the replicas of one process add up to a readiness answer (messaging.replicas)."""

from __future__ import annotations

import pytest
from messaging.replicas import replicas_ready
from servicekit.readiness import NotReady, Rebuilding
from servicekit.runner import replica_id

pytestmark = pytest.mark.unit


def test_ready_with_one_healthy_replica_and_with_all_healthy():
    replicas_ready({"h:1": "ok"}, none="no consumer")
    replicas_ready({"h:1": "ok", "h:2": "ok", "h:3": "ok"}, none="no consumer")


def test_not_ready_without_any_replica_reporting():
    with pytest.raises(NotReady, match=r"^no consumer$"):
        replicas_ready({}, none="no consumer")


def test_one_unhealthy_replica_is_named_even_beside_healthy_ones():
    with pytest.raises(NotReady) as raised:
        replicas_ready({"h:1": "ok", "h:2": "stalled: nothing settled", "h:3": "ok"}, none="-")
    assert not isinstance(raised.value, Rebuilding)
    assert str(raised.value) == "stalled: nothing settled (h:2)"


def test_a_rebuild_is_reported_as_such_and_an_unhealthy_replica_wins_over_it():
    with pytest.raises(Rebuilding, match=r"^rebuilding$"):
        replicas_ready({"h:1": "ok", "h:2": "rebuilding"}, none="-")
    with pytest.raises(Rebuilding, match=r"^wiping$"):
        replicas_ready({"h:1": "rebuilding", "h:2": "wiping"}, none="-")
    with pytest.raises(NotReady) as raised:
        replicas_ready({"h:1": "rebuilding", "h:2": "paused: redis away"}, none="-")
    assert not isinstance(raised.value, Rebuilding)


def test_a_replica_is_named_by_its_host_and_process():
    host, _, pid = replica_id().rpartition(":")
    assert host and int(pid) > 0
