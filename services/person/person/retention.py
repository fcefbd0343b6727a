"""The person service's retention rules: what the importer process prunes (servicekit.retention).

A finished import is deleted IMPORT_RETENTION_DAYS after it finished, with its failures (ON
DELETE CASCADE): its id then answers 404, and its Idempotency-Key may start a new import.
"""

from __future__ import annotations

import functools

import psycopg
from servicekit.retention import Pruner, Rule

from .config import PersonConfig


def rules(config: PersonConfig) -> list[Rule]:
    return [
        Rule(
            "finished imports",
            config.import_retention_days,
            due="SELECT id FROM imports WHERE status = 'done' "
            "AND finished_at < now() - make_interval(secs => %(seconds)s) "
            "AND NOT (id = ANY(%(skip)s)) ORDER BY finished_at, id LIMIT %(limit)s",
            prune="DELETE FROM imports WHERE id = ANY(%(keys)s) AND status = 'done' "
            "AND finished_at < now() - make_interval(secs => %(seconds)s) RETURNING id",
        ),
    ]


def pruner(config: PersonConfig) -> Pruner:
    """The person service's retention, each batch on a connection of its own."""
    return Pruner(
        functools.partial(psycopg.connect, config.person_database_url),
        rules(config),
        config.retention_interval_seconds,
        config.retention_batch,
    )
