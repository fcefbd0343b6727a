"""Traces through the outbox: one registration is one trace, from the person API's request
through the relay's publish and both consumers' applies to the e-mail's send."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from messaging.topology import Topology

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parent / "support" / "trace_one_registration.py"


def test_one_registration_is_one_trace_across_the_outbox_and_both_consumers(
    person_db, notifier_db, broker, servers
):
    for service in ("score", "notifier"):
        broker.topologies.append(Topology(service, broker.exchange, (0.2,)))
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            person_db,
            notifier_db,
            broker.amqp_url,
            broker.exchange,
            servers.redis,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    spans = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    by_trace: dict[str, list[dict]] = defaultdict(list)
    for span in spans:
        by_trace[span["trace"]].append(span)
    request = next(s for s in spans if s["name"] == "POST /person")
    names = {s["name"] for s in by_trace[request["trace"]]}
    assert {
        "POST /person",
        f"publish {broker.exchange}",
        f"apply score.{broker.exchange}",
        f"apply notifier.{broker.exchange}",
        "send e-mail",
    } <= names, names
    # psycopg's spans: the API's own statements, under its request (its pool is traced too)
    statements = {s["name"] for s in spans if s["parent"] == request["span"]}
    assert any(n.startswith(("WITH", "INSERT", "BEGIN", "SELECT")) for n in statements), statements
    ids = {s["span"] for s in by_trace[request["trace"]]}
    assert all(s["parent"] in ids for s in by_trace[request["trace"]] if s is not request)
