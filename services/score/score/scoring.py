"""The credit score formula: pure, on decimals, never floats."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

# Points per item: floor(value / divisor), negative for debts. The item kinds of this model.
DIVISORS = {"income": (Decimal(50), 1), "asset": (Decimal(20), 1), "debt": (Decimal(20), -1)}
KINDS = tuple(DIVISORS)


def points(kind: str, value: Decimal) -> int:
    """Points one item contributes: ⌊asset/20⌋, ⌊income/50⌋ or -⌊debt/20⌋."""
    divisor, sign = DIVISORS[kind]
    return sign * int(value // divisor)  # values are never negative, so // is the floor


def score(items: Iterable[tuple[str, Decimal]]) -> int:
    """Σ⌊asset/20⌋ + Σ⌊income/50⌋ - Σ⌊debt/20⌋ over one person's items."""
    return sum(points(kind, value) for kind, value in items)
