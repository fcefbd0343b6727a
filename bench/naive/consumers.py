"""The naive design's consumers: python -m naive.consumers score|notifier (PYTHONPATH=bench).

Each consumes its queue (NAIVE_QUEUE on AMQP_URL) with automatic acknowledgement and applies
every event as it arrives, without a version gate:

- `score`: the person's hash in Redis (NAIVE_REDIS_URL, keys `<NAIVE_KEY_PREFIX>person:<cpf>`),
  one HSET per event.
- `notifier`: the person's row in PostgreSQL (NAIVE_DATABASE_URL, table `users`, made by
  `prepare`), one autocommitted upsert per event, then the welcome e-mail handed to a pool of
  SENDER_CONCURRENCY threads posting it to SENDGRID_HOST (SENDGRID_API_KEY,
  SENDGRID_CA_FILE, EMAIL_FROM) with the notifier's own composer and transport.

It runs until killed: what it was sent and had not applied is lost, which is the point.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pika
import psycopg
import redis
from notifier.email import Composer, SendGridTransport, tls_context

log = logging.getLogger("naive")

USERS = """
CREATE TABLE IF NOT EXISTS users (
    cpf text PRIMARY KEY, name text, email text, registered_at timestamptz NOT NULL
)
"""
UPSERT = """
INSERT INTO users (cpf, name, email, registered_at) VALUES (%s, %s, %s, %s)
ON CONFLICT (cpf) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email
"""


def prepare(database_url: str) -> None:
    """The notifier's table, in a database of the run's own."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(USERS)


def score() -> Callable[[dict[str, Any]], None]:
    client = redis.Redis.from_url(os.environ["NAIVE_REDIS_URL"])
    prefix = os.environ["NAIVE_KEY_PREFIX"]

    def apply(event: dict[str, Any]) -> None:
        person = event["data"]
        client.hset(f"{prefix}person:{person['cpf']}", mapping={"name": person["name"], "score": 0})

    return apply


def notifier() -> Callable[[dict[str, Any]], None]:
    db = psycopg.connect(os.environ["NAIVE_DATABASE_URL"], autocommit=True)
    senders = int(os.environ.get("SENDER_CONCURRENCY", "8"))
    transport = SendGridTransport(
        os.environ["SENDGRID_API_KEY"],
        os.environ["SENDGRID_HOST"],
        os.environ.get("EMAIL_FROM", "no-reply@example.com"),
        timeout=10.0,
        context=tls_context(os.environ.get("SENDGRID_CA_FILE")),
        connections=senders,
    )
    composer = Composer("naive-activation-secret", "http://person.localhost", 172_800)
    pool = ThreadPoolExecutor(senders, thread_name_prefix="send")

    def send(cpf: str, name: str, email: str, registered_at: str) -> None:
        mail = composer.compose("welcome", cpf, name, email, registered_at)
        delivery = {"id": cpf, "to_email": email, "subject": mail.subject}
        outcome = transport.send({**delivery, "html": mail.html, "text": mail.text})
        if outcome.status != "sent":  # no ledger, no retry: the e-mail is lost
            log.warning("welcome e-mail to %s: %s %s", cpf, outcome.status, outcome.detail)

    def apply(event: dict[str, Any]) -> None:
        person = event["data"]
        cpf, name, email = person["cpf"], person["name"], person.get("email")
        registered_at = datetime.now(UTC)
        db.execute(UPSERT, (cpf, name, email, registered_at))
        if email:
            pool.submit(send, cpf, name, email, registered_at.isoformat())

    return apply


def main(model: str) -> None:
    apply = {"score": score, "notifier": notifier}[model]()
    connection = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
    channel = connection.channel()

    def on_message(_channel: Any, _method: Any, _properties: Any, body: bytes) -> None:
        try:
            apply(json.loads(body))
        except Exception:  # acknowledged already: the event is lost, the consumer goes on
            log.exception("event not applied")

    channel.basic_consume(os.environ["NAIVE_QUEUE"], on_message, auto_ack=True)
    channel.start_consuming()


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    main(sys.argv[1])
