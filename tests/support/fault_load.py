"""What both fault runs share (tests/e2e/test_fault_run.py, test_cluster_fault_run.py).

The load: registrations with e-mails and three item writes each, through Traefik from several
writer threads, pausing at fixed points (`Step`) until the fault of that point is applied, so
every run interleaves the same way. The verdict: what the person database implies both read
models and SendGrid must hold once the faults are over.
"""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal

import pika
import psycopg
from messaging.connection import connect
from messaging.testing import wait_until
from score.store import ScoreStore
from stack.fake_sendgrid import FakeSendGrid
from stack.processes import Gateway

KINDS = ("income", "asset", "debt")


@dataclass
class Step:
    """A fault applied when the load reaches person number `at`; the load waits until it is,
    unless the fault needs the load to go on meanwhile (pause=False)."""

    at: int
    name: str
    apply: Callable[[], None]
    pause: bool = True
    reached: threading.Event = field(default_factory=threading.Event)
    applied: threading.Event = field(default_factory=threading.Event)


def publish(amqp_url: str, exchange: str, messages: list[tuple[str, bytes]]) -> None:
    """(message_id, body) pairs to the exchange, persistent, confirmed and routed."""
    conn = connect(amqp_url, "fault-run")
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for message_id, body in messages:
            channel.basic_publish(
                exchange,
                "",
                body,
                pika.BasicProperties(message_id=message_id, delivery_mode=2),
                mandatory=True,
            )
    finally:
        conn.close()


def drain(amqp_url: str, queue: str) -> list[tuple[str, dict]]:
    """Every message of a queue: (message_id, headers)."""
    conn = connect(amqp_url, "fault-run")
    found = []
    try:
        channel = conn.channel()
        while True:
            method, properties, _ = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((properties.message_id, properties.headers or {}))
    finally:
        conn.close()


class Load:
    """`people` registrations (CPF `cpf_base + n`, e-mail `p<n>@<domain>`) with an income, an
    asset and a debt each, from `writers` threads, while another applies `steps` in order."""

    def __init__(
        self,
        gateway: Gateway,
        steps: list[Step],
        *,
        people: int,
        writers: int,
        seed: int,
        cpf_base: int,
        domain: str,
    ) -> None:
        self.gateway, self.steps, self.writers = gateway, steps, writers
        self.cpf_base, self.domain = cpf_base, domain
        self.gates = {step.at: step for step in steps}
        rng = random.Random(seed)
        self.items = [
            [(kind, str(Decimal(rng.randint(0, 5_000_000)) / 100)) for kind in KINDS]
            for _ in range(people)
        ]
        self.failures: list[str] = []
        self._next = iter(range(people))
        self._lock = threading.Lock()

    def run(self, timeout: float) -> None:
        """Run the load and the faults to the end; every write answered as it should."""
        threads = [threading.Thread(target=self._write) for _ in range(self.writers)]
        threads.append(threading.Thread(target=self._apply_faults))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=timeout)
        assert not self.failures, self.failures[:10]
        assert not any(t.is_alive() for t in threads), "the load did not finish"

    def release(self) -> None:
        """Never leave a writer waiting (for a `finally`)."""
        for step in self.steps:
            step.applied.set()

    def _write(self) -> None:
        while True:
            with self._lock:
                n = next(self._next, None)
                step = self.gates.get(n)
                if step is not None:
                    step.reached.set()
                    if step.pause:
                        step.applied.wait(180)
            if n is None:
                return
            cpf = f"{self.cpf_base + n}"
            status, body = self.gateway.call(
                "POST",
                "person",
                "/person",
                {
                    "cpf": cpf,
                    "name": f"Person {n}",
                    "address": "Rua da Aurora",
                    "date_of_birth": "1990-01-01",
                    "email": f"p{n}@{self.domain}",
                },
            )
            if status != 201:
                self.failures.append(f"register {cpf}: {status} {body[:200]!r}")
                continue
            for kind, value in self.items[n]:
                status, body = self.gateway.call(
                    "POST", "person", f"/person/{cpf}/{kind}", {"type": "x", "value": value}
                )
                if status != 201:
                    self.failures.append(f"{kind} {cpf}: {status} {body[:200]!r}")

    def _apply_faults(self) -> None:
        for step in self.steps:
            step.reached.wait(600)
            try:
                step.apply()
            except BaseException as exc:  # the run goes on; the failure is reported by run()
                self.failures.append(f"fault {step.name!r} could not be applied: {exc!r}")
            finally:
                step.applied.set()


def expected_state(person_db: str) -> tuple[dict[str, str], dict[str, tuple]]:
    """From the person database: e-mail per CPF, and (score, incomes, assets, debts) per CPF."""

    def floor(value: Decimal, step: int) -> int:
        return int((value / step).to_integral_value(rounding=ROUND_FLOOR))

    with psycopg.connect(person_db) as conn:
        emails = dict(conn.execute("SELECT cpf, email FROM person").fetchall())
        totals = {cpf: {k: Decimal("0.00") for k in KINDS} for cpf in emails}
        points = dict.fromkeys(emails, 0)
        for cpf, kind, value in conn.execute("SELECT cpf, kind, value FROM item"):
            totals[cpf][kind] += value
            step = {"income": 50, "asset": 20, "debt": 20}[kind]
            points[cpf] += -floor(value, step) if kind == "debt" else floor(value, step)
    scores = {cpf: (points[cpf], t["income"], t["asset"], t["debt"]) for cpf, t in totals.items()}
    return emails, scores


class Verdict:
    """Both read models and SendGrid against what the person database implies."""

    def __init__(
        self, person_db: str, notifier_db: str, score_store: ScoreStore, sendgrid: FakeSendGrid
    ) -> None:
        self.notifier_db, self.score_store, self.sendgrid = notifier_db, score_store, sendgrid
        self.emails, self.scores = expected_state(person_db)

    def score_mismatches(self) -> list[str]:
        wrong = []
        for cpf, expected in self.scores.items():
            got = self.score_store.read(cpf)
            if got is None or (got.score, got.incomes, got.assets, got.debts) != expected:
                wrong.append(cpf)
        return wrong

    def view_mismatches(self) -> list[str]:
        with psycopg.connect(self.notifier_db) as conn:
            view = dict(conn.execute("SELECT cpf, email FROM users WHERE NOT deleted"))
        return [cpf for cpf, email in self.emails.items() if view.get(cpf) != email] + [
            cpf for cpf in view if cpf not in self.emails
        ]

    def accepted(self) -> collections.Counter[str]:
        """Welcome e-mails SendGrid accepted, per address."""
        return collections.Counter(
            m["personalizations"][0]["to"][0]["email"] for m in list(self.sendgrid.accepted)
        )

    def unsent(self) -> list[str]:
        accepted = self.accepted()
        return [email for email in self.emails.values() if accepted[email] == 0]

    def wait_converged(self, timeout: float, context: Callable[[], str]) -> None:
        """Both read models equal the person database and every welcome went out, within
        `timeout`; otherwise fail with the counts and `context()` (timeline, log tails)."""

        def converged() -> bool:
            return not self.score_mismatches() and not self.view_mismatches() and not self.unsent()

        try:
            wait_until(converged, timeout=timeout, interval=0.5, what="convergence")
        except AssertionError:
            detail = (
                f"scores wrong: {len(self.score_mismatches())}, "
                f"views wrong: {len(self.view_mismatches())}, "
                f"e-mails missing: {len(self.unsent())}\n{context()}"
            )
            raise AssertionError(f"no convergence within {timeout}s: {detail}") from None

    def assert_one_welcome_each(self, in_flight_at_kills: int = 0) -> None:
        """One welcome per address. `in_flight_at_kills`: how many e-mails SIGKILLs of the
        sender could have caught between SendGrid's 202 and the 'sent' mark (the one window
        docs/guarantees.md names: each is sent again after its lease); each may be a second copy,
        never a third."""
        accepted = self.accepted()
        duplicates = {email: n for email, n in accepted.items() if n != 1}
        explained = all(n == 2 for n in duplicates.values()) and (
            len(duplicates) <= in_flight_at_kills
        )
        assert not duplicates or explained, (
            f"welcome e-mails sent more than once: {duplicates} "
            f"({self.sendgrid.abandoned} calls abandoned by their client, "
            f"{in_flight_at_kills} that SIGKILLs of the sender could have caught)"
        )
        assert set(accepted) == set(self.emails.values())
