"""The score model's retention: what its consumer process prunes (servicekit.retention).

A tombstone (a deleted person's or item's hash, kept so that a late event cannot bring it back)
is deleted TOMBSTONE_RETENTION_DAYS after the deletion was applied: by then no older event of
that entity can still arrive but from a dead letter or a parked outbox row sent again by hand,
and verification mends what such a one brings back (docs/guarantees.md: Tombstones).
"""

from __future__ import annotations

from servicekit.retention import Pruner, StoreRule

from .config import ScoreConfig
from .store import ScoreStore


def pruner(config: ScoreConfig, store: ScoreStore) -> Pruner:
    """The score model's retention, in Redis."""
    tombstones = StoreRule(
        "tombstones", config.tombstone_retention_days, store.due_tombstones, store.prune_tombstones
    )
    return Pruner(None, [tombstones], config.retention_interval_seconds, config.retention_batch)
