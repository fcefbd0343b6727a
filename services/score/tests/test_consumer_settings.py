"""The score consumer is built with the linger its environment names (CONSUMER_LINGER_SECONDS)."""

from __future__ import annotations

import pytest
from score.config import ScoreConfig
from score.consumer import build
from score.store import ScoreStore

pytestmark = pytest.mark.integration


def test_the_consumer_takes_its_linger_from_the_configuration(servers, monkeypatch):
    monkeypatch.setenv("CONSUMER_LINGER_SECONDS", "0.25")
    config = ScoreConfig(score_redis_url=servers.redis, events_exchange="linger-test")
    consumer, _ = build(config, ScoreStore.from_url(servers.redis, "linger-test:"))
    assert consumer.settings.linger == 0.25
    monkeypatch.delenv("CONSUMER_LINGER_SECONDS")
    consumer, _ = build(ScoreConfig(score_redis_url=servers.redis, events_exchange="x"))
    assert consumer.settings.linger == 0.01  # the default
