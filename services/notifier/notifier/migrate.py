"""Create the notifier database if needed and apply its migrations: python -m notifier.migrate."""

from __future__ import annotations

import psycopg
from servicekit import migrate

from .config import NotifierConfig


def migrate_database(url: str) -> list[str]:
    migrate.ensure_database(url)
    with psycopg.connect(url) as conn:
        return migrate.apply(conn, "notifier")


def main() -> int:
    applied = migrate_database(NotifierConfig().notifier_database_url)
    print(f"notifier: applied {', '.join(applied) or 'nothing (up to date)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
