"""The console's audit log, in its own database: every action, by whom, on how many messages."""

from __future__ import annotations

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool


class AuditLog:
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def record(self, who: str, action: str, target: str, count: int, detail: str = "") -> None:
        with self.pool.connection() as conn:
            conn.execute(
                "INSERT INTO audit (who, action, target, count, detail) "
                "VALUES (%s, %s, %s, %s, %s)",
                (who, action, target, count, detail[:2000]),
            )

    def recent(self, limit: int = 200) -> list[dict]:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT id, at, who, action, target, count, detail FROM audit "
                "ORDER BY id DESC LIMIT %s",
                (limit,),
            )
            return cur.fetchall()

    def ping(self) -> None:
        with self.pool.connection() as conn:
            conn.execute("SELECT 1")
