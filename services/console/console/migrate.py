"""Create the console's database if needed and apply its migrations: python -m console.migrate."""

from __future__ import annotations

import psycopg
from servicekit import migrate

from .config import ConsoleConfig


def migrate_database(url: str) -> list[str]:
    migrate.ensure_database(url)
    with psycopg.connect(url) as conn:
        return migrate.apply(conn, "console")


def main() -> int:
    applied = migrate_database(ConsoleConfig().console_database_url)
    print(f"console: applied {', '.join(applied) or 'nothing (up to date)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
