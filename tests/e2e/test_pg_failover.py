"""The person and notifier databases on a primary with a synchronous standby, the primary killed
under load (issue 29): no acknowledged write is lost, the relay's lock moves to the new primary,
and every write reaches both read models once.

The whole stack runs with `make up` (two relays: one active, one standby) with
PERSON_DATABASE_URL and NOTIFIER_DATABASE_URL naming both servers of a pair of this module's own
(stack/pg_pair.py) with `target_session_attrs=read-write`. Registrations go through Traefik from
several threads; once enough are acknowledged, the primary is killed (`pg_ctl stop -m immediate`)
and the standby promoted, and the writes go on until as many more are acknowledged. A request
that meets the failover answers 503 (its write may or may not have committed), never anything
else.

The ledger afterwards: every acknowledged registration is in the new primary; everything the new
primary holds is in the score and the notifier's view, with one welcome e-mail each; and every
event on the exchange (a queue of the test's own, bound before the first write, saw them all) is
the new primary's event of that entity and version, so no relay published a write the new
primary does not have, and duplicates, if any, are the same event again.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
import time

import psycopg
import pytest
from messaging.connection import connect
from messaging.testing import wait_until
from relay_lock import relay_lock_holders
from stack.processes import Gateway

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

WRITERS = 4
BEFORE = 150  # acknowledged registrations before the primary is killed
AFTER = 150  # and after the standby was promoted
CPF_BASE = 29_000_000_000
CONVERGE_SECONDS = 120.0


class Registrations:
    """Registrations through Traefik from WRITERS threads until stop(): when each was
    acknowledged (201), which answered 503 (committed or not: the client cannot know) and
    anything else (a failure of the test)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.acked: list[tuple[float, str]] = []
        self.unsure: list[str] = []
        self.wrong: list[str] = []
        self._numbers = iter(range(10**6))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write) for _ in range(WRITERS)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def acked_after(self, moment: float) -> list[str]:
        return [cpf for at, cpf in list(self.acked) if at > moment]

    def _write(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                n = next(self._numbers)
            cpf = str(CPF_BASE + n)
            body = {
                "cpf": cpf,
                "name": f"Person {n}",
                "address": "Rua da Aurora, 1",
                "date_of_birth": "1990-01-01",
                "email": f"p{n}@failover.example",
            }
            try:
                status, raw = self.gateway.call("POST", "person", "/person", body)
            except OSError as exc:
                self.wrong.append(f"{cpf}: {exc!r}")
                continue
            if status == 201:
                self.acked.append((time.perf_counter(), cpf))
            elif status == 503 and b"does not answer" in raw:
                self.unsure.append(cpf)
            else:
                self.wrong.append(f"{cpf}: {status} {raw[:200]!r}")


def published_events(amqp_url: str, queue: str) -> list[dict]:
    """Every event the ledger queue holds (consumed)."""
    conn = connect(amqp_url, "failover-ledger")
    try:
        channel = conn.channel()
        events = []
        while True:
            method, _properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return events
            events.append(json.loads(body))
    finally:
        conn.close()


def missing_scores(stack, cpfs: set[str]) -> set[str]:
    return {cpf for cpf in cpfs if stack.call("GET", "score", f"/{cpf}/score")[0] != 200}


@pytest.mark.timeout(420)
def test_no_acknowledged_write_is_lost_when_the_primary_dies(pg_pair, start_stack, stack_env):
    exchange, amqp = stack_env["EVENTS_EXCHANGE"], stack_env["AMQP_URL"]
    stack = start_stack(
        PERSON_DATABASE_URL=pg_pair.url("person"),
        NOTIFIER_DATABASE_URL=pg_pair.url("notifier"),
        PERSON_RELAYS="2",
    )
    ledger = f"{exchange}.ledger"
    conn = connect(amqp, "failover-ledger")
    channel = conn.channel()
    channel.queue_declare(ledger, durable=True)
    channel.queue_bind(ledger, exchange)
    conn.close()
    writes = Registrations(Gateway(stack.port))
    old, new = pg_pair.primary, pg_pair.standby
    old_person = pg_pair.servers[old].url("person")
    new_person = pg_pair.servers[new].url("person")
    try:
        assert pg_pair.sync_standbys() == 1
        wait_until(lambda: len(relay_lock_holders(old_person)) == 1, what="one relay active")
        writes.start()
        wait_until(lambda: len(writes.acked) >= BEFORE, timeout=120, what="writes before")
        killed_at = time.perf_counter()
        pg_pair.kill_primary()
        pg_pair.promote()
        promoted_at = time.perf_counter()
        wait_until(
            lambda: len(writes.acked_after(promoted_at)) >= AFTER, timeout=120, what="writes after"
        )
        writes.stop()
        moments = sorted(at for at, _ in writes.acked)
        print(
            f"promoted {promoted_at - killed_at:.2f}s after the kill; no write acknowledged for "
            f"{max(b - a for a, b in itertools.pairwise(moments)):.2f}s at most; "
            f"{len(writes.unsure)} answered 503"
        )
        assert not writes.wrong, writes.wrong[:10]

        with psycopg.connect(new_person) as db:
            stored = {cpf for (cpf,) in db.execute("SELECT cpf FROM person")}
            outbox = {
                (entity, entity_id, version): event_id
                for entity, entity_id, version, event_id in db.execute(
                    "SELECT entity, entity_id, entity_version, event_id::text FROM messaging_outbox"
                )
            }
        acked = {cpf for _, cpf in writes.acked}
        assert not acked - stored, f"acknowledged but lost: {sorted(acked - stored)[:10]}"
        assert stored <= acked | set(writes.unsure)

        # The relay that leads now holds its lock on the new primary, and only one does.
        wait_until(lambda: len(relay_lock_holders(new_person)) == 1, what="a relay on the new")
        [holder] = relay_lock_holders(new_person)
        assert holder.startswith("messaging-relay@")

        notifier = pg_pair.servers[new].url("notifier")

        def welcomes() -> dict[str, list[str]]:
            with psycopg.connect(notifier) as db:
                rows = db.execute(
                    "SELECT u.cpf, u.version, d.status FROM users u "
                    "LEFT JOIN deliveries d ON d.cpf = u.cpf AND d.kind = 'welcome'"
                ).fetchall()
            found: dict[str, list[str]] = collections.defaultdict(list)
            for cpf, version, status in rows:
                assert version == 1, (cpf, version)
                found[cpf].append(status)
            return found

        def converged() -> bool:
            view = welcomes()
            sent = {cpf for cpf, states in view.items() if states == ["sent"]}
            return sent == stored and not missing_scores(stack, stored)

        wait_until(converged, timeout=CONVERGE_SECONDS, interval=1, what="both read models")
        for cpf in stored:
            status, score, _ = stack.call("GET", "score", f"/{cpf}/score")
            assert status == 200 and score["version"] == 1, (cpf, score)

        # Every event published is the new primary's event of its entity and version.
        events = published_events(amqp, ledger)
        seen = collections.defaultdict(set)
        for event in events:
            key = (event["entity"], event["entity_id"], event["entity_version"])
            seen[key].add(event["event_id"])
        strangers = {key: ids for key, ids in seen.items() if ids != {outbox.get(key)}}
        assert not strangers, f"published, but not the new primary's event: {strangers}"
        assert set(seen) == set(outbox), "an event of the new primary was never published"
        print(f"{len(events)} events published for {len(outbox)} in the outbox")
    finally:
        writes.stop()
        conn = connect(amqp, "failover-ledger")
        conn.channel().queue_delete(ledger)
        conn.close()
