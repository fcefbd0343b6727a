"""One registration traced end to end, in one process with an in-memory span exporter:
python tests/support/trace_one_registration.py PERSON_DB NOTIFIER_DB AMQP_URL EXCHANGE REDIS_URL

The person API (its test client), the relay, the score and notifier consumers and the e-mail
sender run here on threads over the real servers, sharing one tracer provider. Prints the
finished spans as JSON lines: name, trace id, span id, parent span id.
"""

from __future__ import annotations

import json
import sys
import uuid

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # before anything is built: tracing.enabled() is now true

from messaging import Relay, RelaySettings  # noqa: E402
from messaging.testing import running, wait_until  # noqa: E402
from notifier.config import NotifierConfig  # noqa: E402
from notifier.consumer import build as build_notifier  # noqa: E402
from notifier.sender import Sender  # noqa: E402
from person.app import create_app  # noqa: E402
from person.config import PersonConfig  # noqa: E402
from psycopg_pool import ConnectionPool  # noqa: E402
from score.config import ScoreConfig  # noqa: E402
from score.consumer import build as build_score  # noqa: E402
from score.store import ScoreStore  # noqa: E402


def main(person_db: str, notifier_db: str, amqp: str, exchange: str, redis_url: str) -> int:
    settings = {"amqp_url": amqp, "events_exchange": exchange, "retry_delays": (0.2,)}
    person = create_app(PersonConfig(person_database_url=person_db, api_keys=None, **settings))
    notifier = NotifierConfig(notifier_database_url=notifier_db, **settings)
    score_store = ScoreStore.from_url(redis_url, f"{exchange}:")
    score_store.mark_ready()  # a fresh store that needs no replay
    # Both consumers as their processes build them.
    score, _ = build_score(ScoreConfig(**settings), score_store)
    with ConnectionPool(notifier_db, min_size=1, max_size=4) as pool:
        users, store = build_notifier(notifier, pool)
        relay = Relay(RelaySettings(person_db, amqp, exchange, poll_interval=0.2))
        with running(score), running(users):
            wait_until(
                lambda: score.attached.is_set() and users.attached.is_set(),
                what="consumers attached",
            )
            with running(relay), running(Sender(store, notifier, None)):
                cpf = str(uuid.uuid4().int % 10**11)
                answer = person.test_client().post(
                    "/person",
                    json={
                        "cpf": cpf,
                        "name": "Traced",
                        "address": "a",
                        "date_of_birth": "1990-01-01",
                        "email": "traced@example.com",
                    },
                )
                assert answer.status_code == 201, answer.get_data(as_text=True)
                wait_until(
                    lambda: store.mailbox(5, "traced@example.com"),
                    timeout=30,
                    what="the welcome e-mail sent",
                )
                wait_until(
                    lambda: any(s.name == "send e-mail" for s in exporter.get_finished_spans()),
                    what="the send's span",
                )
        score_store.wipe()
    for span in exporter.get_finished_spans():
        print(
            json.dumps(
                {
                    "name": span.name,
                    "trace": f"{span.context.trace_id:032x}",
                    "span": f"{span.context.span_id:016x}",
                    "parent": f"{span.parent.span_id:016x}" if span.parent else None,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
