"""What end-to-end tests read of a running stack: the scores the person database implies, the
score's store, a metric through Traefik."""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from score.store import ScoreStore


def expected_scores(person_db: str) -> dict[str, int]:
    def floor(value: Decimal, step: int) -> int:
        return int((value / step).to_integral_value(rounding=ROUND_FLOOR))

    with psycopg.connect(person_db) as conn:
        scores = {cpf: 0 for (cpf,) in conn.execute("SELECT cpf FROM person")}
        for cpf, kind, value in conn.execute("SELECT cpf, kind, value FROM item"):
            step = {"income": 50, "asset": 20, "debt": 20}[kind]
            scores[cpf] += -floor(value, step) if kind == "debt" else floor(value, step)
    return scores


def score_store(stack) -> ScoreStore:
    env = stack.env
    return ScoreStore.from_url(env["SCORE_REDIS_URL"], env["SCORE_KEY_PREFIX"])


def scores_match(stack, store: ScoreStore) -> bool:
    expected = expected_scores(stack.env["PERSON_DATABASE_URL"])
    return all((got := store.read(cpf)) and got.score == s for cpf, s in expected.items())


def metric(stack, host: str, name: str, **labels: str) -> float:
    """A sample's value from the service's /metrics, through Traefik (0 when absent)."""
    status, text, _ = stack.call("GET", host, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
