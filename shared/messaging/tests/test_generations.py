"""The generation markers self-healing read models keep (messaging.generations), in Redis, in
PostgreSQL and in memory (messaging.testing): one contract, against the real stores."""

from __future__ import annotations

import uuid

import pytest
import redis
from messaging.generations import PostgresGeneration, RedisGeneration
from messaging.testing import MemoryGeneration
from psycopg_pool import ConnectionPool


@pytest.fixture(
    params=[
        pytest.param("memory", marks=pytest.mark.unit),
        pytest.param("redis", marks=pytest.mark.integration),
        pytest.param("postgres", marks=pytest.mark.integration),
    ]
)
def generations(request):
    if request.param == "memory":
        yield MemoryGeneration()
    elif request.param == "redis":
        client = redis.Redis.from_url(request.getfixturevalue("servers").redis)
        key = f"test-generation-{uuid.uuid4().hex[:8]}"
        yield RedisGeneration(client, key)
        client.delete(key)
    else:
        url = request.getfixturevalue("make_database")("generation")
        with ConnectionPool(url, min_size=1, max_size=2) as pool:
            yield PostgresGeneration(pool, "model")


def test_only_the_first_to_find_no_marker_claims_the_rebuild(generations):
    assert generations.generation() is None
    assert generations.claim_rebuild("first")
    assert not generations.claim_rebuild("second")
    marker = generations.generation()
    assert (marker.state, marker.request_id, marker.since) == ("rebuilding", "first", 0.0)


def test_a_rebuild_is_ready_only_once_the_completion_and_the_settled_count_agree(generations):
    assert generations.claim_rebuild("r")
    generations.begin_rebuild("r", 1.0)
    assert not generations.count_replayed("r", 2)  # no completion yet: the total is unknown
    assert not generations.finish_rebuild("r", 3)
    assert generations.generation().state == "rebuilding"
    assert not generations.count_replayed("other", 5)  # not the current request
    assert generations.count_replayed("r", 1)
    assert generations.generation().state == "ready"
    assert not generations.count_replayed("r", 1)  # ready already: nothing more to say


def test_a_completion_after_every_replayed_event_was_settled_makes_the_model_ready(generations):
    generations.begin_rebuild("r", 1.0)
    assert not generations.count_replayed("r", 4)
    assert generations.finish_rebuild("r", 4)
    assert generations.generation().state == "ready"


def test_a_new_request_starts_the_count_again(generations):
    generations.begin_rebuild("r1", 1.0)
    generations.count_replayed("r1", 5)
    generations.begin_rebuild("r2", 2.0)
    assert not generations.finish_rebuild("r2", 3)
    assert generations.generation().state == "rebuilding"


def test_a_request_is_renewed_only_while_the_marker_is_still_its_rebuild(generations):
    assert not generations.renew_rebuild("r", 5.0)  # no marker: nothing to renew
    assert generations.generation() is None
    assert generations.claim_rebuild("r")
    generations.count_replayed("r", 2)
    assert generations.renew_rebuild("r", 5.0)
    marker = generations.generation()
    assert (marker.state, marker.request_id, marker.since) == ("rebuilding", "r", 5.0)
    assert not generations.finish_rebuild("r", 1)  # the count started again with the request
    generations.begin_rebuild("theirs", 6.0)  # another party's request since
    assert not generations.renew_rebuild("r", 7.0)
    marker = generations.generation()
    assert (marker.request_id, marker.since) == ("theirs", 6.0)
    assert generations.finish_rebuild("theirs", 0)  # ready: a rebuild no longer to renew
    assert not generations.renew_rebuild("theirs", 8.0)
    assert generations.generation().state == "ready"


def test_a_stale_marker_is_abandoned_only_while_it_is_still_the_same_one(generations):
    generations.begin_rebuild("r", 1.0)
    assert not generations.abandon("another")
    assert generations.abandon("r")
    assert generations.generation() is None
