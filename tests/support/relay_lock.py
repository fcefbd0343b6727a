"""Which relay is active: the sessions holding the relay's advisory lock in a producer database."""

from __future__ import annotations

import psycopg
from messaging.relay import LEADER_LOCK


def relay_lock_holders(database_url: str) -> list[str]:
    """application_name of each session holding the leader lock in this database: one name
    `messaging-relay@<host>:<pid>` while a relay is active, none while none is."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.objid = %s AND l.granted "
            # This database's: a relay of another stack on the machine holds the same lock id.
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (LEADER_LOCK,),
        ).fetchall()
    return [name for (name,) in rows]
