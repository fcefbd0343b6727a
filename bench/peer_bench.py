"""The cost of safety: the stack against the seed's naive design (bench/naive/), end to end.

Run: .venv/bin/python bench/peer_bench.py. Prints `naive_registrations_s`,
`ours_registrations_s`, `safety_cost_ratio`, `naive_cpu_ms_per_registration`,
`ours_cpu_ms_per_registration` and `cpu_safety_cost_ratio` (bench/README.md); logs on stderr.

Each system runs in turn, complete, on databases, queues, a Redis prefix and ports of its own
(removed afterwards), behind the same Traefik, with its e-mail going to a fake SendGrid over TLS
in this process (stack.fake_sendgrid, a certificate authority made for the run): the naive
design (its API, its two consumers), then the stack (stack_bench.py's, with SENDGRID_HOST the
fake instead of the development mailbox, so its sender takes the production path). On each, after
a short warm-up, `wrk` posts registrations (a new CPF and an e-mail each) for POST_SECONDS from
POST_CLIENTS connections, as stack_bench's `post_person_rps`; the clock runs from the start of
that load until every registration the API accepted is in Redis, in the notifier's `users` and
its welcome e-mail accepted by the fake. Registrations per second end to end, and the CPU of
every process of the system and of the servers over the same interval per registration
(post_bench.CpuMeter; the fake's and wrk's CPU are not counted, and are the same for both).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pika
import psycopg
import redis
from email_bench import child_process, trust_bundle
from naive.consumers import prepare as prepare_naive_notifier
from post_bench import CpuMeter, app_behind_gateway, naive_exchange, need_wrk, wrk_post
from relay_bench import AMQP_URL, REDIS_URL, MeasureError, fresh_database, interrupted
from stack.fake_sendgrid import FakeSendGrid
from stack.tls_ca import LocalCA
from stack_bench import (
    POST_CLIENTS,
    POST_SECONDS,
    RELAY,
    BrokerWatch,
    running_stack,
    stack_environment,
)

ROOT = Path(__file__).resolve().parent.parent
WARMUP_SECONDS = 2.0  # of wrk before the measurement: pools, connections, the fake's TLS sessions
DONE_TIMEOUT = 180.0
DONE_INTERVAL = 0.02  # seconds between two looks at the stores while waiting
ATTACH_TIMEOUT = 30.0
EMAIL_ENV = {
    "SENDGRID_API_KEY": "SG.peer-bench-key",
    "EMAIL_FROM": "bench@example.com",
}

log = logging.getLogger("bench.peer")


@dataclass
class System:
    """A running system as the measurement sees it: where to post, where to look."""

    name: str
    port: int  # Traefik's
    meter: CpuMeter
    person_db: psycopg.Connection  # the producer's database
    person_table: str
    notifier_db: psycopg.Connection  # holds `users`
    person_key: Callable[[str], str]  # a person's key in Redis
    fake: FakeSendGrid
    check_alive: Callable[[], None]

    def accepted(self, prefix: str) -> list[str]:
        """The CPFs of this prefix the API committed."""
        rows = self.person_db.execute(
            f"SELECT cpf FROM {self.person_table} WHERE cpf LIKE %s", (f"{prefix}%",)
        ).fetchall()
        return [row[0] for row in rows]

    def users(self, prefix: str) -> int:
        return self.notifier_db.execute(
            "SELECT count(*) FROM users WHERE cpf LIKE %s", (f"{prefix}%",)
        ).fetchone()[0]


def in_redis(client: redis.Redis, keys: list[str]) -> int:
    return sum(client.exists(*keys[i : i + 1000]) for i in range(0, len(keys), 1000))


class Mails:
    """The addresses of one registration prefix among the e-mails the fake accepted, read
    incrementally (a late e-mail of the warm-up is not one of the measurement's)."""

    def __init__(self, fake: FakeSendGrid, prefix: str) -> None:
        self.fake, self.start = fake, f"p{prefix}"
        self.seen = 0
        self.addresses: list[str] = []

    def count(self) -> int:
        with self.fake.lock:
            new = self.fake.accepted[self.seen :]
        self.seen += len(new)
        for message in new:
            address = message["personalizations"][0]["to"][0]["email"]
            if address.startswith(self.start):
                self.addresses.append(address)
        return len(self.addresses)


def wait_done(system: System, client: redis.Redis, prefix: str) -> tuple[float, list[str]]:
    """perf_counter() at the first look that finds every registration of `prefix` the API
    committed in both stores and its e-mail accepted by the fake (cheapest look first), and
    those registrations. A request still in the API when wrk stopped may commit after the first
    reading of the list: the list is read again once it looks done."""
    mails = Mails(system.fake, prefix)
    cpfs = system.accepted(prefix)
    if not cpfs:
        raise MeasureError(f"{system.name}: no registration accepted")
    keys = [system.person_key(cpf) for cpf in cpfs]
    deadline = time.perf_counter() + DONE_TIMEOUT
    while True:
        now = time.perf_counter()
        if (
            mails.count() >= len(cpfs)
            and system.users(prefix) >= len(cpfs)
            and in_redis(client, keys) == len(keys)
        ):
            again = system.accepted(prefix)
            if len(again) == len(cpfs):
                break
            cpfs, keys = again, [system.person_key(cpf) for cpf in again]
        if now > deadline:
            raise MeasureError(
                f"{system.name}: after {DONE_TIMEOUT}s, of {len(cpfs)} registrations "
                f"{system.users(prefix)} in users, {in_redis(client, keys)} in Redis, "
                f"{mails.count()} e-mails"
            )
        system.check_alive()
        time.sleep(DONE_INTERVAL)
    expected = sorted(f"p{cpf}@bench.example" for cpf in cpfs)
    if sorted(mails.addresses) != expected:  # one welcome each, to each of them
        wrong = sorted(set(mails.addresses) ^ set(expected))[:3]
        raise MeasureError(
            f"{system.name}: {len(mails.addresses)} e-mails for {len(cpfs)} registrations "
            f"({len(set(mails.addresses))} addresses; e.g. {wrong})"
        )
    return now, cpfs


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def saturate(system: System, scratch: Path, phase: str) -> dict[str, float]:
    """Warm up, then wrk for POST_SECONDS; registrations per second from the start of the load
    until all of them are in both stores with their e-mail sent, and CPU ms per registration."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        wrk_post(system.port, f"{phase}0", scratch, POST_CLIENTS, WARMUP_SECONDS)
        wait_done(system, client, f"{phase}0")
        prefix = f"{phase}1"
        cpu_before, fake_before = system.meter.snapshot(), own_cpu()
        start = time.perf_counter()
        got = wrk_post(system.port, prefix, scratch, POST_CLIENTS, POST_SECONDS)
        api_done = time.perf_counter()
        end, cpfs = wait_done(system, client, prefix)
        spent = CpuMeter.spent(cpu_before, system.meter.snapshot())
        fake_cpu = own_cpu() - fake_before
    finally:
        client.close()
    n = len(cpfs)
    log.info(
        "%s: %d registrations, the API took %.0f/s for %.0fs, all in both stores with their "
        "e-mail %.1fs after the load ended; %.0f/s end to end; CPU seconds %s; "
        "this process (the fake SendGrid, wrk's results) %.2f",
        system.name,
        n,
        got["rps"],
        api_done - start,
        end - api_done,
        n / (end - start),
        ", ".join(f"{k} {v:.2f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])),
        fake_cpu,
    )
    return {"registrations_s": n / (end - start), "cpu_ms": sum(spent.values()) * 1000 / n}


# -- the two systems ---------------------------------------------------------------------------
def wait_consumed(queues: list[str], children: list[subprocess.Popen]) -> None:
    """Until each queue has a consumer (the naive consumers attached)."""
    deadline = time.monotonic() + ATTACH_TIMEOUT
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = conn.channel()
        while True:
            counts = [
                channel.queue_declare(queue=q, passive=True).method.consumer_count for q in queues
            ]
            if all(counts):
                return
            if any(child.poll() is not None for child in children):
                raise MeasureError("a naive consumer exited")
            if time.monotonic() > deadline:
                raise MeasureError(f"naive consumers not attached after {ATTACH_TIMEOUT}s")
            time.sleep(0.2)
    finally:
        conn.close()


def wipe_keys(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i : i + 1000])
    finally:
        client.close()


@contextlib.contextmanager
def naive_system(
    run_id: str, email_env: dict[str, str], fake: FakeSendGrid, scratch: Path
) -> Iterator[System]:
    """The naive design: its API (post_apps.naive) behind Traefik and its two consumers."""
    env = stack_environment(f"naive-{run_id}")
    exchange, key_prefix = f"bench-naive-{run_id}", f"bench-naive-{run_id}:"
    with (
        fresh_database(f"bench_naive_person_{run_id}") as person_url,
        fresh_database(f"bench_naive_notifier_{run_id}") as notifier_url,
        naive_exchange(AMQP_URL, exchange) as queues,
        app_behind_gateway("naive", env, person_url, exchange, scratch) as (port, processes),
    ):
        prepare_naive_notifier(notifier_url)
        consumer_env = {
            **env,
            **email_env,
            "PYTHONPATH": str(ROOT / "bench"),
            "NAIVE_REDIS_URL": REDIS_URL,
            "NAIVE_KEY_PREFIX": key_prefix,
            "NAIVE_DATABASE_URL": notifier_url,
        }
        command = [sys.executable, "-m", "naive.consumers"]
        try:
            with (
                child_process(
                    [*command, "score"],
                    {**consumer_env, "NAIVE_QUEUE": queues[0]},
                    scratch / "naive-score.log",
                ) as score,
                child_process(
                    [*command, "notifier"],
                    {**consumer_env, "NAIVE_QUEUE": queues[1]},
                    scratch / "naive-notifier.log",
                ) as notifier,
                psycopg.connect(person_url, autocommit=True) as person_db,
                psycopg.connect(notifier_url, autocommit=True) as notifier_db,
            ):
                children = {**processes, "naive-score": score, "naive-notifier": notifier}
                wait_consumed(queues, [score, notifier])

                def check_alive() -> None:
                    gone = [name for name, child in children.items() if child.poll() is not None]
                    if gone:
                        raise MeasureError(f"naive process(es) exited: {gone}; logs in {scratch}")

                yield System(
                    "naive",
                    port,
                    CpuMeter(SimpleNamespace(processes=children)),
                    person_db,
                    "bench_person",
                    notifier_db,
                    lambda cpf: f"{key_prefix}person:{cpf}",
                    fake,
                    check_alive,
                )
        finally:
            wipe_keys(key_prefix)


@contextlib.contextmanager
def our_system(run_id: str, email_env: dict[str, str], fake: FakeSendGrid) -> Iterator[System]:
    """The stack (stack_bench.py's), its e-mail to the fake SendGrid, its relay running."""
    with running_stack(run_id, overrides=email_env) as stack:
        stack.start(RELAY)
        with (
            psycopg.connect(stack.person_db, autocommit=True) as person_db,
            psycopg.connect(stack.notifier_db, autocommit=True) as notifier_db,
        ):
            yield System(
                "ours",
                stack.gateway_port,
                CpuMeter(stack),
                person_db,
                "person",
                notifier_db,
                stack.score_store().person_key,
                fake,
                stack.check_alive,
            )


def run() -> dict[str, float]:
    """Measure each system in turn, printing its figures as they come, then the ratios; a system
    that could not be measured is logged and left out."""
    run_id = uuid.uuid4().hex[:8]
    figures: dict[str, float] = {}
    watch = BrokerWatch()
    watch.start()
    with tempfile.TemporaryDirectory(prefix=f"peer-bench-{run_id}-") as tmp:
        scratch = Path(tmp)
        ca = LocalCA.make(scratch / "ca", name=f"peer bench CA {run_id}")
        email_env = {
            **EMAIL_ENV,
            "SENDGRID_CA_FILE": str(trust_bundle(ca.ca_file, scratch / "trusted.pem")),
        }
        for name, system, phase in (
            ("naive", lambda env, fake: naive_system(run_id, env, fake, scratch), "81"),
            ("ours", lambda env, fake: our_system(run_id, env, fake), "82"),
        ):
            fake = FakeSendGrid(tls=ca.server_context()).start()
            try:
                with system({**email_env, "SENDGRID_HOST": fake.url}, fake) as running:
                    begin = time.perf_counter()
                    got = saturate(running, scratch, phase)
                if watch.away_between(begin, time.perf_counter()):
                    raise MeasureError("RabbitMQ was away meanwhile; run again")
            except Exception as exc:
                log.error("%s: not measured (%s: %s)", name, type(exc).__name__, exc)
                continue
            finally:
                fake.stop()
            show(figures, f"{name}_registrations_s", got["registrations_s"])
            show(figures, f"{name}_cpu_ms_per_registration", got["cpu_ms"])
    watch.stopping.set()
    if "ours_registrations_s" in figures and "naive_registrations_s" in figures:
        rate = figures["ours_registrations_s"] / figures["naive_registrations_s"]
        show(figures, "safety_cost_ratio", rate)
        cpu = figures["naive_cpu_ms_per_registration"] / figures["ours_cpu_ms_per_registration"]
        show(figures, "cpu_safety_cost_ratio", cpu)
    return figures


def show(figures: dict[str, float], name: str, value: float) -> None:
    """Record and print a figure: rates as integers, CPU milliseconds and ratios to 0.01."""
    figures[name] = value
    print(f"{name}: {value:.{0 if name.endswith('_s') else 2}f}", flush=True)


FIGURES = (
    "naive_registrations_s",
    "naive_cpu_ms_per_registration",
    "ours_registrations_s",
    "ours_cpu_ms_per_registration",
    "safety_cost_ratio",
    "cpu_safety_cost_ratio",
)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the figures; 1 if they could not be measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    need_wrk()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # failures surface as exceptions
    signal.signal(signal.SIGTERM, interrupted)  # run the clean-ups, as on Ctrl-C
    try:
        figures = run()
    except (Exception, KeyboardInterrupt) as exc:
        log.error("peer benchmark aborted (%s: %s)", type(exc).__name__, exc)
        return 1
    missing = [name for name in FIGURES if name not in figures]
    if missing:
        log.error("not measured: %s", ", ".join(missing))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
