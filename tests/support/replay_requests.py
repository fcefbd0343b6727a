"""The replay requests waiting in a broker space's requests queue, taken off it (tests of healing
and verification read what a consumer asked the producer for)."""

from __future__ import annotations

import json

import pika
from messaging.replay import requests_queue


def take_requests(amqp_url: str, exchange: str) -> list[dict]:
    """Every request waiting, decoded, oldest first; the queue is left empty."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = conn.channel()
        found = []
        while True:
            method, _, body = channel.basic_get(requests_queue(exchange), auto_ack=True)
            if method is None:
                return found
            found.append(json.loads(body))
    finally:
        conn.close()
