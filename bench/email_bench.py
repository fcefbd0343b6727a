"""The production e-mail path: the sender process against a local TLS fake of SendGrid.

Run: .venv/bin/python bench/email_bench.py [--emails N] [--trust-env NAME]. Prints
`emails_tls_s` and `email_cpu_ms` (bench/README.md); logs on stderr.

A certificate authority is made for the run (stack.tls_ca) and the fake SendGrid of
the tests (stack.fake_sendgrid) answers `POST /v3/mail/send` over TLS with a
certificate it signed. The sender (`python -m notifier.sender`, the production defaults:
SENDER_CONCURRENCY=8) trusts a bundle of the system's CA certificates plus that CA, given as
SENDGRID_CA_FILE, so its TLS context loads as many certificates as in production. N welcome
e-mails are recorded beforehand through the notifier's own view (not timed), not yet due; once
the sender has started and reported, they are made due in one statement and the clock and the
sender's CPU (user + system, from /proc) run until every one is `sent`. The sender composes
each e-mail (templates and signed link) as it sends it, so its CPU includes composing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pwd
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from messaging import Envelope
from notifier.consumer import UserView
from notifier.migrate import migrate_database
from notifier.store import NotifierStore
from psycopg_pool import ConnectionPool
from relay_bench import MeasureError, fresh_database, interrupted
from stack.fake_sendgrid import FakeSendGrid
from stack.tls_ca import LocalCA

ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("email_bench")

EMAILS = 1000
APPLY_BATCH = 200  # events per transaction when recording the e-mails
READY_TIMEOUT = 30.0
POLL_INTERVAL = 0.02
CLOCK = os.sysconf("SC_CLK_TCK")
SENDER_ENV = {
    "SENDGRID_API_KEY": "SG.email-bench-key",
    "EMAIL_FROM": "bench@example.com",
    "LOG_LEVEL": "WARNING",
    "LOG_FORMAT": "text",
}


def person_created(cpf: str) -> Envelope:
    at = datetime.now(UTC).isoformat()
    data = {
        "cpf": cpf,
        "name": f"Bench Person {cpf}",
        "address": "Rua da Aurora, 1, Recife",
        "date_of_birth": "1990-01-01",
        "email": f"p{cpf}@bench.example",
        "status": "pending",
        "created_at": at,
        "updated_at": at,
    }
    return Envelope.new(
        event_type="person.created", entity_id=cpf, entity_version=1, data=data, producer="person"
    )


def record_emails(db_url: str, n: int) -> None:
    """N welcome e-mails through the notifier's view, then none of them due yet."""
    with ConnectionPool(db_url, min_size=1, max_size=1) as pool:
        view = UserView(NotifierStore(pool))
        for first in range(0, n, APPLY_BATCH):
            batch = [person_created(f"{i:011d}") for i in range(first, min(n, first + APPLY_BATCH))]
            view.apply([view.handlers.translate(event) for event in batch])
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE deliveries SET next_attempt_at = now() + interval '1 day'")
        pending = conn.execute(
            "SELECT count(*) FROM deliveries WHERE status = 'pending'"
        ).fetchone()
    if pending[0] != n:
        raise MeasureError(f"{pending[0]} pending e-mails recorded of {n}")


def trust_bundle(ca_file: Path, into: Path) -> Path:
    """The system's CA certificates followed by the run's CA: what the sender trusts."""
    paths = ssl.get_default_verify_paths()
    system = next((Path(p) for p in (paths.cafile, paths.openssl_cafile) if p), None)
    parts = []
    if system is not None and system.is_file():
        parts.append(system.read_bytes())
    else:
        log.warning("no system CA bundle found: the sender trusts the run's CA alone")
    parts.append(ca_file.read_bytes())
    into.write_bytes(b"\n".join(parts))
    return into


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK


def postgres_cpu_seconds() -> float:
    """CPU seconds of every process of the postgres user (the server, for context)."""
    try:
        uid = pwd.getpwnam("postgres").pw_uid
    except KeyError:
        return 0.0
    total = 0.0
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if proc.name.isdigit() and proc.stat().st_uid == uid:
                total += cpu_seconds(int(proc.name))
    return total


@contextlib.contextmanager
def child_process(
    command: list[str], env: dict[str, str], log_file: Path
) -> Iterator[subprocess.Popen]:
    """A process in a group of its own, logging to `log_file`; SIGTERM (SIGKILL after 15 s) on
    the way out."""
    with log_file.open("wb") as out:
        child = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield child
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def sender_process(
    env: dict[str, str], log_file: Path
) -> contextlib.AbstractContextManager[subprocess.Popen]:
    return child_process([sys.executable, "-m", "notifier.sender"], env, log_file)


def wait_for(check: Any, timeout: float, what: str, sender: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if sender.poll() is not None:
            raise MeasureError(f"the sender exited ({sender.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise MeasureError(f"{what}: not within {timeout:.0f}s")
        time.sleep(POLL_INTERVAL)


def measure(n: int, trust_env: str) -> dict[str, float]:
    run_id = uuid.uuid4().hex[:10]
    with (
        tempfile.TemporaryDirectory(prefix=f"email-bench-{run_id}-") as tmp,
        fresh_database(f"bench_email_{run_id}") as db_url,
    ):
        ca = LocalCA.make(Path(tmp) / "ca", name=f"email bench CA {run_id}")
        bundle = trust_bundle(ca.ca_file, Path(tmp) / "trusted.pem")
        fake = FakeSendGrid(tls=ca.server_context()).start()
        try:
            migrate_database(db_url)
            started = time.monotonic()
            record_emails(db_url, n)
            log.info("%d e-mails recorded in %.1fs (not timed)", n, time.monotonic() - started)
            env = {
                **os.environ,
                **SENDER_ENV,
                "NOTIFIER_DATABASE_URL": db_url,
                "SENDGRID_HOST": fake.url,
                trust_env: str(bundle),
            }
            with (
                sender_process(env, Path(tmp) / "sender.log") as sender,
                psycopg.connect(db_url, autocommit=True) as conn,
            ):

                def reported() -> bool:
                    return bool(
                        conn.execute(
                            "SELECT 1 FROM heartbeats WHERE starts_with(name, 'notifier-sender@')"
                        ).fetchone()
                    )

                def sent() -> int:
                    return conn.execute(
                        "SELECT count(*) FROM deliveries WHERE status = 'sent'"
                    ).fetchone()[0]

                wait_for(reported, READY_TIMEOUT, "its first report", sender)
                cpu, pg, own = cpu_seconds(sender.pid), postgres_cpu_seconds(), _own_cpu()
                start = time.perf_counter()
                conn.execute("UPDATE deliveries SET next_attempt_at = now()")
                wait_for(lambda: sent() >= n, 60 + n / 5, f"{n} e-mails sent", sender)
                seconds = time.perf_counter() - start
                cpu = cpu_seconds(sender.pid) - cpu
                pg, own = postgres_cpu_seconds() - pg, _own_cpu() - own
                states = dict(
                    conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status")
                )
            if sender.returncode not in (0, None):
                log.warning("sender exited with %s: %s", sender.returncode, _tail(tmp))
        finally:
            fake.stop()
        log.info(
            "%d e-mails in %.2fs; sender %.2f CPU s, PostgreSQL %.2f, this process (the fake) "
            "%.2f; SendGrid accepted %d over %d connections (%d TLS handshakes); deliveries %s",
            n,
            seconds,
            cpu,
            pg,
            own,
            len(fake.accepted),
            fake.connections,
            fake.handshakes,
            states,
        )
        if len(fake.accepted) != n:
            raise MeasureError(f"SendGrid accepted {len(fake.accepted)} e-mails, {n} expected")
        return {"emails_tls_s": n / seconds, "email_cpu_ms": cpu * 1000 / n}


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tail(directory: str) -> str:
    return (Path(directory) / "sender.log").read_text(errors="replace")[-2000:]


def main(argv: list[str] | None = None) -> int:
    """Measure and print both figures; 1 if they could not be measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=EMAILS, help=f"default {EMAILS}")
    parser.add_argument(
        "--trust-env",
        default="SENDGRID_CA_FILE",
        help="the variable that gives the sender the CA bundle (SSL_CERT_FILE: for a notifier "
        "that predates SENDGRID_CA_FILE; OpenSSL's default verify paths read it)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, interrupted)  # run the clean-ups, as on Ctrl-C
    try:
        figures = measure(args.emails, args.trust_env)
    except Exception as exc:
        log.error("e-mail benchmark: not measured (%s: %s)", type(exc).__name__, exc)
        return 1
    print(f"emails_tls_s: {figures['emails_tls_s']:.0f}", flush=True)
    print(f"email_cpu_ms: {figures['email_cpu_ms']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
