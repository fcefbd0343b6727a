"""A consumer process for the fault tests: applies each event once into PostgreSQL.

Usage: python apply_consumer.py DATABASE_URL AMQP_URL EXCHANGE SERVICE
Each event is claimed in an inbox table and recorded in `applied`, in one transaction that also
holds the store a few milliseconds (a realistic handler), so a signal lands mid-batch.
"""

from __future__ import annotations

import sys

import psycopg
from messaging import Consumer, ConsumerSettings, Envelope, Topology
from servicekit.runner import configure_logging, run_until_signalled

SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (
    event_id uuid PRIMARY KEY, entity_id text NOT NULL, version bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox (event_id uuid PRIMARY KEY);
"""


def make_handler(database_url: str, service: str):
    """Return a handler applying events exactly once in effect, and its connection."""
    conn = psycopg.connect(database_url)
    with conn.transaction():
        conn.execute(SCHEMA)

    def handle(envelope: Envelope) -> None:
        with conn.transaction(), conn.cursor() as cur:
            # The event's id as a primary key claims it once (an inbox, in the handler's own
            # transaction): a redelivered event applies nothing more.
            cur.execute(
                "INSERT INTO inbox VALUES (%s) ON CONFLICT DO NOTHING", (envelope.event_id,)
            )
            if cur.rowcount == 1:
                cur.execute(
                    "INSERT INTO applied (event_id, entity_id, version) VALUES (%s, %s, %s)",
                    (envelope.event_id, envelope.entity_id, envelope.entity_version),
                )
            cur.execute("SELECT pg_sleep(0.003)")

    return handle, conn


def main(database_url: str, amqp_url: str, exchange: str, service: str) -> int:
    configure_logging()
    handle, _conn = make_handler(database_url, service)
    topology = Topology(service=service, exchange=exchange, retry_delays=(0.2, 0.4))
    consumer = Consumer(ConsumerSettings(amqp_url, topology, max_batch=20), handle)
    return run_until_signalled(consumer)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
