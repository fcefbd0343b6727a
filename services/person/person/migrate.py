"""Create the person database if needed and apply its migrations: python -m person.migrate."""

from __future__ import annotations

import psycopg
from messaging import outbox
from servicekit import migrate

from .config import PersonConfig


def migrate_database(url: str) -> list[str]:
    migrate.ensure_database(url)
    with psycopg.connect(url) as conn:
        # install() only adds what is missing: 002 brings older databases the relay's stats,
        # 004 the index on published_at, 006 the rows' trace context, 008 digests that leave
        # deleted entities out (read models may then prune their tombstones).
        steps = {
            "000_outbox": outbox.install,
            "002_relay_stats": outbox.install,
            "004_outbox_published_at": outbox.install,
            "006_outbox_trace_context": outbox.install,
            "008_outbox_deletions_uncounted": outbox.install,
        }
        return migrate.apply(conn, "person", steps)


def main() -> int:
    applied = migrate_database(PersonConfig().person_database_url)
    print(f"person: applied {', '.join(applied) or 'nothing (up to date)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
