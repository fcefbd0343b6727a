"""Check that PostgreSQL, RabbitMQ and Redis answer; say which URL did not and how to start it."""

from __future__ import annotations

import os
import sys

import pika
import psycopg
import redis
from psycopg.conninfo import make_conninfo

DEFAULTS = {
    "PERSON_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/person",
    "NOTIFIER_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/notifier",
    "AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
    "SCORE_REDIS_URL": "redis://127.0.0.1:6379/0",
}
POSTGRES_HINT = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
HINTS = {
    "PERSON_DATABASE_URL": POSTGRES_HINT,
    "NOTIFIER_DATABASE_URL": POSTGRES_HINT,
    "AMQP_URL": "rabbitmq-server -detached",
    "SCORE_REDIS_URL": "redis-server --daemonize yes --port 6379",
}


def _postgres(url: str) -> None:
    # The service databases may not exist yet: the server answering is what matters here.
    psycopg.connect(make_conninfo(url, dbname="postgres"), connect_timeout=3).close()


def _rabbitmq(url: str) -> None:
    params = pika.URLParameters(url)
    params.socket_timeout = params.blocked_connection_timeout = 3
    params.connection_attempts = 1
    pika.BlockingConnection(params).close()


def _redis(url: str) -> None:
    redis.Redis.from_url(url, socket_connect_timeout=3).ping()


CHECKS = {
    "PERSON_DATABASE_URL": _postgres,
    "NOTIFIER_DATABASE_URL": _postgres,
    "AMQP_URL": _rabbitmq,
    "SCORE_REDIS_URL": _redis,
}


def main() -> int:
    failed = 0
    for variable, check in CHECKS.items():
        url = os.environ.get(variable, DEFAULTS[variable])
        shown = _hide_password(url)
        try:
            check(url)
        except Exception as exc:
            failed += 1
            print(f"✗ {variable}={shown} did not answer ({type(exc).__name__}).")
            print(f"  Start it (for example: {HINTS[variable]}) or point {variable} at it.")
        else:
            print(f"✓ {variable}={shown}")
    return 1 if failed else 0


def _hide_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


if __name__ == "__main__":
    sys.exit(main())
