"""The score API over a real Redis read model."""

from __future__ import annotations

from decimal import Decimal

import pytest
from messaging.consumer import ConsumerStats
from messaging.testing import wait_until
from score.app import create_app
from score.config import ScoreConfig
from score.store import ItemChange, PersonChange

pytestmark = pytest.mark.integration


@pytest.fixture
def client(score_store, servers):
    config = ScoreConfig(amqp_url=servers.amqp)
    return create_app(config, store=score_store).test_client()


def test_score_of_the_seed_person(client, score_store):
    score_store.apply(
        [
            PersonChange("11111", 1, False),
            ItemChange("i", 1, False, "11111", "income", Decimal("1000.00")),
            ItemChange("a", 1, False, "11111", "asset", Decimal("100000.00")),
            ItemChange("d", 1, False, "11111", "debt", Decimal("1000.00")),
        ]
    )
    response = client.get("/11111/score")
    assert response.status_code == 200
    assert response.json == {
        "cpf": "11111",
        "score": 4970,
        "incomes": "1000.00",
        "assets": "100000.00",
        "debts": "1000.00",
        "version": 4,
        "person_version": 1,
    }


def test_unknown_person_is_404_with_the_error_shape(client):
    response = client.get("/424242/score")
    assert response.status_code == 404
    assert set(response.json) == {"message", "errors"}


def test_deleted_person_is_404(client, score_store):
    score_store.apply([PersonChange("5", 1, False), PersonChange("5", 2, True)])
    assert client.get("/5/score").status_code == 404


def test_ready_fails_until_the_consumer_is_attached(client, score_store):
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json["checks"]["consumer"] == "failing: the score consumer is not attached"
    score_store.beat("host:1", {"health": "ok", "stats": {}}, ttl=10)
    assert client.get("/ready").status_code == 200


@pytest.mark.parametrize(
    ("beat", "status", "check"),
    [
        ("rebuilding", "rebuilding", "rebuilding: rebuilding"),
        ("wiping", "rebuilding", "rebuilding: wiping"),
        ("stalled: messages wait", "not ready", "failing: stalled: messages wait"),
        ("the consumer's worker is not running", "not ready", "failing: the consumer's worker"),
    ],
)
def test_ready_says_what_the_consumer_reports(client, score_store, beat, status, check):
    score_store.beat("host:1", {"health": beat, "stats": {}}, ttl=10)
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json["status"] == status
    assert response.json["checks"]["consumer"].startswith(check)


def test_ready_with_replicas_needs_every_reporting_one_healthy(client, score_store):
    score_store.beat("host:1", {"health": "ok", "stats": {}}, ttl=10)
    score_store.beat("host:2", {"health": "stalled: messages wait", "stats": {}}, ttl=10)
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json["checks"]["consumer"] == "failing: stalled: messages wait (host:2)"
    score_store.beat("host:2", {"health": "ok", "stats": {}}, ttl=10)
    assert client.get("/ready").status_code == 200


def test_a_replica_that_stopped_beating_no_longer_counts(client, score_store):
    score_store.beat("host:1", {"health": "ok", "stats": {}}, ttl=10)
    score_store.beat("host:2", {"health": "paused: the store does not answer", "stats": {}}, ttl=1)
    assert client.get("/ready").status_code == 503
    wait_until(lambda: client.get("/ready").status_code == 200, what="host:2's beat expired")
    assert set(score_store.beacons()) == {"host:1"}


def test_metrics_have_a_series_per_replica(client, score_store):
    for replica, applied in (("host:1", 3), ("host:2", 4)):
        stats = ConsumerStats()
        stats.observe(0.001, applied)
        score_store.beat(replica, {"health": "ok", "stats": stats.snapshot()}, ttl=10)
    text = client.get("/metrics").data.decode()
    assert 'consumer_messages_total{outcome="applied",replica="host:1"} 3.0' in text
    assert 'consumer_messages_total{outcome="applied",replica="host:2"} 4.0' in text


def test_standard_routes(client):
    assert client.get("/health").json["status"] == "ok"
    assert "/{cpf}/score" in client.get("/openapi.json").json["paths"]
    assert b"http_request_duration_seconds" in client.get("/metrics").data


def test_a_rebuild_takes_over_a_wipe_that_stopped_making_progress(client, score_store):
    import time

    marker = score_store.generation_key
    score_store.client.hset(
        marker, mapping={"state": "wiping", "request": "w", "since": time.time()}
    )
    assert client.post("/rebuild").status_code == 409  # a live wipe is not disturbed
    score_store.client.hset(marker, mapping={"since": 0})  # its process went away long ago
    assert client.post("/rebuild").status_code == 202
    wait_until(lambda: score_store.generation() is None, what="the new wipe done")


def test_ready_fails_when_redis_answers_but_refuses_writes(private_redis, servers):
    import redis
    from score.store import ScoreStore

    client = redis.Redis.from_url(private_redis)
    app = create_app(ScoreConfig(amqp_url=servers.amqp), store=ScoreStore(client, "r:"))
    client.config_set("maxmemory", 1)
    answer = app.test_client().get("/ready")
    assert answer.status_code == 503
    assert answer.json["checks"]["redis"] == "failing: OutOfMemoryError"


def test_a_redis_that_does_not_answer_is_a_503_to_try_again(servers):
    import socket

    import redis
    from score.store import ScoreStore

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    store = ScoreStore(redis.Redis(port=closed, socket_connect_timeout=0.5), "x:")
    response = (
        create_app(ScoreConfig(amqp_url=servers.amqp), store=store).test_client().get("/1/score")
    )
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
