"""Retention: rows older than their setting pruned in bounded batches, in a long-running process.

A service names its rules (which rows are due, what pruning does to them) and runs a `Pruner`
beside its own work: a daemon thread that prunes every rule at start and then every
`every_seconds`. Each batch is one short transaction of at most `batch` rows; a batch that fails
is tried row by row, and a row that still fails is logged and skipped for the rest of that run,
so one bad row cannot stop the others, and a rule that fails entirely does not stop the next.

A `Rule` is SQL run on the pruner's PostgreSQL connections; a `StoreRule` brings its own two
steps, for a store of another kind (the score's Redis), and is pruned in the same batches.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import psycopg

log = logging.getLogger("servicekit.retention")

Connect = Callable[[], contextlib.AbstractContextManager[psycopg.Connection]]


@dataclass(frozen=True)
class Rule:
    """One kind of row to prune after `days`.

    `due` selects the keys of due rows: it gets `%(seconds)s` (the age), `%(skip)s` (keys to
    leave out) and `%(limit)s`. `prune` prunes the rows of `%(keys)s` (with `%(seconds)s` again,
    so it can check they are still due) and returns one row per row it pruned.
    """

    name: str
    days: float
    due: str
    prune: str

    @property
    def seconds(self) -> float:
        return self.days * 86_400


@dataclass(frozen=True)
class StoreRule:
    """One kind of entry to prune after `days`, in a store the rule reaches itself.

    `due(seconds, skip, limit)` returns the keys of at most `limit` due entries (none of `skip`);
    `prune(seconds, keys)` prunes those still due, atomically each, and says how many it pruned.
    """

    name: str
    days: float
    due: Callable[[float, list[Any], int], list[Any]]
    prune: Callable[[float, list[Any]], int]

    @property
    def seconds(self) -> float:
        return self.days * 86_400


class Pruner:
    """Prunes each rule's due rows, `batch` at a time, at most `max_batches` per rule and run."""

    def __init__(
        self,
        connect: Connect | None,
        rules: Collection[Rule | StoreRule],
        every_seconds: float = 3600.0,
        batch: int = 500,
        max_batches: int = 100,
    ) -> None:
        if connect is None and any(isinstance(rule, Rule) for rule in rules):
            raise ValueError("a SQL rule needs a way to connect to its database")
        self.connect, self.rules = connect, list(rules)
        self.every_seconds, self.batch, self.max_batches = every_seconds, batch, max_batches
        self._stop = threading.Event()

    def start(self) -> Pruner:
        """Prune in a daemon thread now and every `every_seconds`, until stop()."""
        threading.Thread(target=self._loop, name="retention", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def run_once(self) -> dict[str, int]:
        """Prune every rule once; the rows pruned per rule (a rule that failed: what it did)."""
        pruned: dict[str, int] = {}
        for rule in self.rules:
            try:
                pruned[rule.name] = self._prune(rule)
            except Exception:  # the database went away, a bug: the next rule, the next run
                log.exception("retention: pruning %s failed", rule.name)
                pruned.setdefault(rule.name, 0)
            if pruned[rule.name]:
                log.info(
                    "retention: pruned %d %s (older than %g days)",
                    pruned[rule.name],
                    rule.name,
                    rule.days,
                    extra={"rule": rule.name, "pruned": pruned[rule.name]},
                )
        return pruned

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.every_seconds)

    def _prune(self, rule: Rule | StoreRule) -> int:
        skipped: list[Any] = []
        total = 0
        for _ in range(self.max_batches):
            if self._stop.is_set():
                break
            keys = self._due(rule, skipped)
            if not keys:
                break
            try:
                total += self._apply(rule, keys)
            except psycopg.OperationalError:
                raise  # the database, not a row: this rule waits for the next run
            except psycopg.Error:
                total += self._one_by_one(rule, keys, skipped)
            if len(keys) < self.batch:
                break
        return total

    def _due(self, rule: Rule | StoreRule, skipped: list[Any]) -> list[Any]:
        if isinstance(rule, StoreRule):
            return rule.due(rule.seconds, skipped, self.batch)
        assert self.connect is not None  # __init__ refused SQL rules without it
        with self.connect() as conn:
            rows = conn.execute(
                rule.due, {"seconds": rule.seconds, "skip": skipped, "limit": self.batch}
            ).fetchall()
        return [row[0] for row in rows]

    def _apply(self, rule: Rule | StoreRule, keys: list[Any]) -> int:
        if isinstance(rule, StoreRule):
            return rule.prune(rule.seconds, keys)
        assert self.connect is not None  # __init__ refused SQL rules without it
        with self.connect() as conn, conn.transaction():
            return len(conn.execute(rule.prune, {"seconds": rule.seconds, "keys": keys}).fetchall())

    def _one_by_one(self, rule: Rule | StoreRule, keys: list[Any], skipped: list[Any]) -> int:
        total = 0
        for key in keys:
            try:
                total += self._apply(rule, [key])
            except psycopg.OperationalError:
                raise
            except psycopg.Error:
                log.exception("retention: %s %s cannot be pruned; skipped", rule.name, key)
                skipped.append(key)
        return total
