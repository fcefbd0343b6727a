"""The store adapters' common parts (messaging.stores): error translation, version gates and
write probes, against the real PostgreSQL and Redis where they are about them."""

from __future__ import annotations

import pytest
from messaging import RetryableError, StoreUnavailable
from messaging.stores import cluster_nodes, redis_client, redis_errors


@pytest.mark.unit
@pytest.mark.parametrize(
    ("reply", "outage"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", True),
        ("READONLY You can't write against a read only replica.", True),
        ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable", True),
        ("NOREPLICAS Not enough good replicas to write.", True),
        ("BUSY Redis is busy running a script.", True),
        ("CLUSTERDOWN The cluster is down", True),
        ("TRYAGAIN Multiple keys request during rehashing of slot", True),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
    ],
)
def test_write_refusals_are_outages_and_other_errors_the_changes_own(reply, outage):
    from redis._parsers import _RESP2Parser

    parsed = _RESP2Parser(65536).parse_error(reply)  # the error redis-py raises for that reply
    expected = StoreUnavailable if outage else RetryableError
    with pytest.raises(expected), redis_errors():
        raise parsed


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "nodes"),
    [
        ("redis://127.0.0.1:6379/0", None),
        ("unix:///run/redis.sock", None),
        (
            "redis+cluster://:s3cret@a:7000,b:7001, c:7002",
            ("redis://:s3cret@a:7000", [("b", 7001), ("c", 7002)]),
        ),
        (
            "rediss+cluster://u:p@a:7000,b/0?socket_timeout=2",
            ("rediss://u:p@a:7000/0?socket_timeout=2", [("b", 6379)]),
        ),
        ("redis+cluster://a:7000", ("redis://a:7000", [])),
        ("redis://:p@a:7000/0,redis://:p@b:7001/0", ("redis://:p@a:7000/0", [("b", 7001)])),
    ],
)
def test_a_cluster_url_names_its_nodes_and_one_server_url_none(url, nodes):
    assert cluster_nodes(url) == nodes


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+cluster://:s3cret@a:7000/2", "only database 0"),
        ("redis+cluster://:s3cret@a:port,b:7001", "node 1 has no valid port"),
        ("redis://:s3cret@a:7000,amqp://b:5672", "node 2 is not host:port"),
        ("redis+cluster://:s3cret@", "node 1 is not host:port"),
    ],
)
def test_a_cluster_url_that_is_wrong_says_why_without_its_password(url, reason):
    with pytest.raises(ValueError, match=reason) as refused:
        cluster_nodes(url)
    assert "s3cret" not in str(refused.value)


@pytest.mark.unit
def test_a_cluster_client_is_made_on_first_use_and_an_absent_cluster_is_an_outage():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    client = redis_client(f"redis+cluster://127.0.0.1:{closed}", socket_connect_timeout=0.5)
    script = client.register_script("return 1")  # no connection needed for its SHA
    assert len(script.sha) == 40
    with pytest.raises(StoreUnavailable), redis_errors():
        client.ping()
