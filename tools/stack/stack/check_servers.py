"""Check that the servers a stack needs answer: python -m stack.check_servers NAME=URL...

The caller names the checks (the stack script passes each service's configured URL under the
variable that sets it); the kind of server comes from the URL's scheme (`unix://` is redis-py's
Redis on a Unix socket; a PostgreSQL socket is libpq's `host=/var/run/postgresql`, in a URL's
query or a keyword/value list, and is probed like any other PostgreSQL URL). For each one that does
not answer, it says which variable, the URL with its password hidden, and how to start it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

import psycopg
from messaging.connection import connect
from psycopg.conninfo import make_conninfo


def _postgres(url: str) -> None:
    # The service databases may not exist yet: the server answering is what matters here.
    psycopg.connect(make_conninfo(url, dbname="postgres"), connect_timeout=3).close()


def _rabbitmq(url: str) -> None:
    # One node of a cluster answering is enough: the clients connect to the first that does.
    connect(url, "check-servers", timeout=3).close()


def _redis(url: str) -> None:
    # One server, or a Redis Cluster (redis+cluster://a:7000,b:7001): a node of it answering.
    from messaging.stores import redis_client

    redis_client(url, socket_connect_timeout=3).ping()


KINDS: dict[str, tuple[Callable[[str], None], str]] = {
    "postgresql": (
        _postgres,
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    ),
    "postgres": (
        _postgres,
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    ),
    "amqp": (_rabbitmq, "rabbitmq-server -detached"),
    "amqps": (_rabbitmq, "rabbitmq-server -detached"),
    "redis": (_redis, "redis-server --daemonize yes --port 6379"),
    # redis-py's form for a Redis on a Unix socket: unix:///run/redis/redis.sock?db=0
    "unix": (_redis, "redis-server --daemonize yes --port 0 --unixsocket <the URL's path>"),
    "redis+cluster": (_redis, "python -m stack.redis_cluster start"),
    "rediss+cluster": (_redis, "python -m stack.redis_cluster start"),
}


def check(checks: list[tuple[str, str]]) -> int:
    """(variable, URL) pairs; print a line for each; 1 if any did not answer."""
    failed = 0
    for variable, url in checks:
        shown = hide_password(url)
        scheme = scheme_of(url)
        if scheme not in KINDS:
            failed += 1
            print(f"✗ {variable}={shown}: no check for {scheme}:// URLs.")
            continue
        probe, hint = KINDS[scheme]
        try:
            probe(url)
        except ValueError as exc:  # the URL itself is wrong (its messages repeat no password)
            failed += 1
            print(f"✗ {variable}={shown}: {exc}")
        except Exception as exc:
            failed += 1
            print(f"✗ {variable}={shown} did not answer ({type(exc).__name__}).")
            print(f"  Start it (for example: {hint}) or point {variable} at it.")
        else:
            print(f"✓ {variable}={shown}")
    return 1 if failed else 0


def scheme_of(url: str) -> str:
    """The URL's scheme; `postgresql` for libpq's keyword/value form (`host=a,b port=...`)."""
    if "://" in url:
        return url.partition("://")[0]
    return "postgresql" if "=" in url else url


# libpq's `password` setting: a keyword/value pair (quoted or not) or a URL's query parameter.
_PASSWORD_SETTING = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)")


def hide_password(url: str) -> str:
    """The URL with `***` for its password: each node's of a comma-separated list (AMQP nodes,
    PostgreSQL hosts), and a libpq `password=` setting."""
    url = _PASSWORD_SETTING.sub(r"\1***", url)
    return ",".join(_hide_user_password(part) for part in url.split(","))


def _hide_user_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def main(argv: list[str] | None = None) -> int:
    pairs = argv if argv is not None else sys.argv[1:]
    if not pairs or not all("=" in pair for pair in pairs):
        print("usage: python -m stack.check_servers NAME=URL...", file=sys.stderr)
        return 2
    return check([tuple(pair.split("=", 1)) for pair in pairs])


if __name__ == "__main__":
    sys.exit(main())
