"""Unit: the score formula."""

from decimal import Decimal

import pytest
from score.scoring import points, score

pytestmark = pytest.mark.unit


def test_the_seed_payloads_score_4970():
    items = [("income", Decimal(1000)), ("asset", Decimal(100000)), ("debt", Decimal(1000))]
    assert score(items) == 4970


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("asset", "19.99", 0),
        ("asset", "20.00", 1),
        ("asset", "39.99", 1),
        ("income", "49.99", 0),
        ("income", "50", 1),
        ("income", "0", 0),
        ("debt", "19.99", 0),
        ("debt", "20", -1),
        ("debt", "1000", -50),
        ("asset", "999999999999999.99", 49999999999999),
    ],
)
def test_each_item_contributes_the_floor_of_its_share(kind, value, expected):
    assert points(kind, Decimal(value)) == expected


def test_floors_apply_per_item_not_to_the_sum():
    assert score([("asset", Decimal("19.99")), ("asset", Decimal("19.99"))]) == 0


def test_exact_decimals_do_not_drift_like_floats():
    # 0.1 + 0.2 style drift would push 59.99 over 60 with floats summed per cent.
    assert score([("asset", Decimal("0.10")) for _ in range(199)]) == 0
    assert points("asset", Decimal("60.00") - Decimal("0.01")) == 2


def test_no_items_scores_zero():
    assert score([]) == 0
