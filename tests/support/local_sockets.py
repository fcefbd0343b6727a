"""The test server's PostgreSQL through its Unix socket, where it has one on this machine."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from psycopg.conninfo import conninfo_to_dict

SOCKET_DIR = "/var/run/postgresql"  # Debian's; the system server's socket


def socket_url(tcp_url: str) -> str:
    """The same database, user and port through the server's socket; skip where the test
    server has none here (a container)."""
    port = conninfo_to_dict(tcp_url).get("port", "5432")
    if not Path(SOCKET_DIR, f".s.PGSQL.{port}").exists():
        pytest.skip(f"no PostgreSQL socket for port {port} in {SOCKET_DIR}")
    params = {k: v for k, v in conninfo_to_dict(tcp_url).items() if k not in ("host", "hostaddr")}
    return f"postgresql:///{params.pop('dbname')}?host={SOCKET_DIR}&" + "&".join(
        f"{k}={quote(v, safe='')}" for k, v in params.items()
    )
