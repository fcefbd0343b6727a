"""Fixtures of the score service's tests: a real Redis with a key prefix of the test's own,
and the same tests again on a Redis Cluster of the run's own (marked `cluster`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from messaging import Envelope
from messaging.stores import redis_client as client_for
from score.store import ScoreStore


@pytest.fixture(params=["redis", pytest.param("redis-cluster", marks=pytest.mark.cluster)])
def redis_url(request: pytest.FixtureRequest, servers) -> str:
    """The run's Redis, or its Redis Cluster (tests/support/redis_cluster.py)."""
    if request.param == "redis":
        return servers.redis
    return request.getfixturevalue("redis_cluster").url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    client = client_for(redis_url)
    yield client
    client.close()


@pytest.fixture
def score_store(redis_client) -> Iterator[ScoreStore]:
    store = ScoreStore(redis_client, prefix=f"test-{uuid.uuid4().hex[:8]}:")
    yield store
    store.wipe()


class History:
    """A random but reproducible stream of person-service events, with the scores it implies."""

    def __init__(self, seed: int = 7, people: int = 40) -> None:
        import random

        self.rng = random.Random(seed)
        self.cpfs = [str(10_000 + n) for n in range(people)]
        self.versions: dict[tuple[str, str], int] = {}
        self.alive: set[str] = set()
        self.items: dict[str, tuple[str, str, Decimal]] = {}  # id -> (cpf, kind, value)
        self.events: list[Envelope] = []

    def _emit(self, entity: str, entity_id: str, change: str, data: dict | None) -> None:
        key = (entity, entity_id)
        self.versions[key] = self.versions.get(key, 0) + 1
        self.events.append(
            Envelope.new(
                event_type=f"{entity}.{change}",
                entity_id=entity_id,
                entity_version=self.versions[key],
                data=data,
                producer="person",
            )
        )

    def generate(self, count: int) -> list[Envelope]:
        while len(self.events) < count:
            cpf = self.rng.choice(self.cpfs)
            if cpf not in self.alive:
                self.alive.add(cpf)
                self._emit("person", cpf, "created", {"cpf": cpf, "name": "n"})
                continue
            roll = self.rng.random()
            owned = [i for i, (c, _, _) in self.items.items() if c == cpf]
            if roll < 0.6:
                kind = self.rng.choice(("income", "asset", "debt"))
                value = Decimal(self.rng.randrange(0, 2_000_000)) / 100
                item_id = str(uuid.UUID(int=self.rng.getrandbits(128)))
                self.items[item_id] = (cpf, kind, value)
                self._emit(
                    kind,
                    item_id,
                    "created",
                    {"id": item_id, "cpf": cpf, "kind": kind, "value": str(value)},
                )
            elif roll < 0.8 and owned:
                item_id = self.rng.choice(owned)
                self._emit(self.items.pop(item_id)[1], item_id, "deleted", None)
            elif roll < 0.95:
                self._emit("person", cpf, "updated", {"cpf": cpf, "name": "m"})
            else:
                for item_id in owned:
                    self._emit(self.items.pop(item_id)[1], item_id, "deleted", None)
                self.alive.discard(cpf)
                self._emit("person", cpf, "deleted", None)
        return self.events

    def expected(self) -> dict[str, int | None]:
        """Each CPF's score, None where the person does not exist."""
        from score.scoring import score

        return {
            cpf: score((k, v) for c, k, v in self.items.values() if c == cpf)
            if cpf in self.alive
            else None
            for cpf in self.cpfs
        }


@pytest.fixture
def history() -> History:
    return History()
