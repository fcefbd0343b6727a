"""PostgreSQL connections that follow their database to a new server (a restart, a failover).

A database URL may list several servers, as libpq does: `postgresql://a:5432,b:5432/person?
target_session_attrs=read-write` or `host=a,b port=5432,5432 dbname=person
target_session_attrs=read-write`. Every connection then goes to the one that takes writes,
so after a standby is promoted the next connection finds it. `check_url` refuses a list of
servers without that attribute: a connection could land on a standby and fail every write.

`connection_pool` is the pool every service uses. psycopg_pool notices a dead server only
connection by connection, each failing one more request, and reconnects with delays doubling
for five minutes. This pool checks every idle connection as soon as one comes back broken, and
gives a slot up after RECONNECT_SECONDS of failed attempts, so that the next request to wait
for a connection starts a fresh attempt: a promoted standby is found within a second or two,
not after a delay that grew with the outage.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

RECONNECT_SECONDS = 3.0
WRITABLE = ("read-write", "primary")  # target_session_attrs that only ever land on a primary


def check_url(variable: str, url: str) -> str:
    """The URL if libpq can read it and, when it lists several servers, it asks for the one that
    takes writes; otherwise a ValueError naming the variable (never the URL: it may hold a
    password)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise ValueError(f"{variable} is not a PostgreSQL URL or key=value list") from None
    servers = str(params.get("host") or params.get("hostaddr") or "").count(",") + 1
    if servers > 1 and params.get("target_session_attrs") not in WRITABLE:
        raise ValueError(
            f"{variable} lists {servers} servers: add target_session_attrs=read-write, "
            "so that it connects to the one that takes writes (a standby refuses them)"
        )
    return url


class FailoverPool(ConnectionPool):
    """A ConnectionPool that drops every idle connection to a server once one of them is lost."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("reconnect_timeout", RECONNECT_SECONDS)
        super().__init__(*args, **kwargs)
        self._sweeping = threading.Lock()

    def putconn(self, conn: psycopg.Connection) -> None:
        lost = conn.broken
        super().putconn(conn)
        if lost and self._sweeping.acquire(blocking=False):
            # On a thread of its own: checking a connection to a server that went silent
            # (no reset, no answer) waits for TCP, and the request returning this one must not.
            threading.Thread(target=self._sweep, name=f"{self.name}-sweep", daemon=True).start()

    def _sweep(self) -> None:
        try:
            with contextlib.suppress(Exception):  # the pool closing meanwhile
                self.check()
        finally:
            self._sweeping.release()


def connection_pool(
    url: str, name: str, max_size: int, min_size: int = 1, timeout: float = 5.0
) -> FailoverPool:
    """An open pool over `url`; a request waits at most `timeout` seconds for a connection
    (PoolTimeout: the API's 503), so a database that does not answer never hangs a request."""
    return FailoverPool(
        url, min_size=min_size, max_size=max_size, name=name, timeout=timeout, open=True
    )
