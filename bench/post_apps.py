"""Two minimal apps the POST figures are compared with (bench/post_bench.py), served by gunicorn
with the person API's settings (bench/post_apps.conf.py) behind the same Traefik:

- `ceiling()`: POST /person inserts one row and commits; nothing else. What this machine can do
  for this shape of request: the ceiling of `post_person_rps`.
- `naive()`: the original write-up's design: the row is inserted, the event published to
  RabbitMQ inside the request (persistent, no publisher confirm), then the transaction commits.
  No outbox, no relay: what the outbox's guarantee is measured against (`post_naive_rps`).

Their database is BENCH_APP_DATABASE_URL (a table `bench_person`, made by `prepare`); the naive
app publishes to the fanout exchange BENCH_APP_EXCHANGE on AMQP_URL.
"""

from __future__ import annotations

import json
import os
import threading

import pika
import psycopg
from flask import Flask, request
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

TABLE = "CREATE TABLE IF NOT EXISTS bench_person (cpf text PRIMARY KEY, body jsonb NOT NULL)"


def prepare(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(TABLE)


def _app(publish: bool) -> Flask:
    app = Flask("bench-post")
    pool = ConnectionPool(os.environ["BENCH_APP_DATABASE_URL"], min_size=2, max_size=10)
    channels = threading.local()
    exchange = os.environ.get("BENCH_APP_EXCHANGE", "")

    def channel() -> pika.adapters.blocking_connection.BlockingChannel:
        if getattr(channels, "channel", None) is None:
            connection = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
            channels.channel = connection.channel()
        return channels.channel

    @app.post("/person")
    def create() -> tuple[dict, int]:
        person = request.get_json()
        with pool.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO bench_person (cpf, body) VALUES (%s, %s)",
                (str(person["cpf"]), Jsonb(person)),
            )
            if publish:
                event = {"event_type": "person.created", "data": person}
                channel().basic_publish(
                    exchange,
                    "",
                    json.dumps(event).encode(),
                    pika.BasicProperties(content_type="application/json", delivery_mode=2),
                )
        return {"message": "created", **person}, 201

    return app


def ceiling() -> Flask:
    return _app(publish=False)


def naive() -> Flask:
    return _app(publish=True)
