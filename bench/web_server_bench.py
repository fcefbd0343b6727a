"""The person API under gunicorn and under Granian (WSGI, the same Flask app): which web server
(bench/README.md, part `web`; the decision in docs/benchmark.md).

Both serve `person.app:create_app()` on one migrated database of the run's own, with the same
processes and threads (PERSON_WORKERS processes of PERSON_THREADS threads each: 2 and 4), access
logs on (one line per request) and LOG_LEVEL=INFO. wrk loads each server directly (Traefik's cost
is the same for both and would only dilute the difference) with POST /person (a CPF no other
request uses, post_bench's wrk script) and GET /health, CLIENTS connections for SECONDS each. The
machine is shared: the servers take turns, ROUNDS rounds in alternating order, and each figure
is the best round's (highest requests/s; lowest CPU ms per request of the server's processes,
from /proc).

Run: .venv/bin/python bench/web_server_bench.py [--rounds N] [--seconds S]. Prints
`<server>_post_person_rps`, `<server>_post_cpu_ms`, `<server>_health_rps`,
`<server>_health_cpu_ms` for gunicorn and granian, `granian_vs_gunicorn_ratio` (POST) and
`granian_vs_gunicorn_health_ratio`.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

from person.migrate import migrate_database
from post_bench import CpuMeter, MeasureError, need_wrk, wrk_get, wrk_post
from relay_bench import fresh_database, interrupted
from servicekit.serving import gunicorn_settings
from stack.processes import free_port
from stack_bench import stack_environment

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("gunicorn", "granian")
ROUNDS = 3
SECONDS = 8.0
WARMUP_SECONDS = 2.0
CLIENTS = 16  # stack_bench's POST_CLIENTS
START_TIMEOUT = 60.0
# Granian's access line, as close to gunicorn's (servicekit.serving) as its fields allow: it has
# no response size and sees request headers only, so a generated request id shows as `-`.
GRANIAN_ACCESS_FORMAT = (
    '%(addr)s "%(method)s %(path)s %(protocol)s" %(status)d - %(dt_ms).3fms '
    "request_id=%(header{x-request-id})s"
)

log = logging.getLogger("bench.web")


def server_command(server: str, port: int, scratch: Path) -> list[str]:
    """The command line of `server` on 127.0.0.1:`port` with the person API's settings."""
    if server == "gunicorn":  # the Procfile's
        return [
            sys.executable, "-m", "gunicorn", "-c", "services/person/gunicorn.conf.py",
            "person.app:create_app()",
        ]  # fmt: skip
    settings = gunicorn_settings("PERSON", port)
    log_config = scratch / "granian-log.json"
    loggers = settings["logconfig_dict"]["loggers"]
    log_config.write_text(
        json.dumps(
            {
                **settings["logconfig_dict"],
                "loggers": {
                    "_granian": loggers["gunicorn.error"],
                    "granian.access": loggers["gunicorn.access"],
                    "pika": loggers["pika"],
                },
            }
        )
    )
    return [
        sys.executable, "-m", "granian", "--interface", "wsgi", "--factory",
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(settings["workers"]), "--blocking-threads", str(settings["threads"]),
        "--runtime-threads", "1", "--no-ws", "--http", "1",
        "--workers-kill-timeout", str(settings["graceful_timeout"]),
        "--log-config", str(log_config), "--access-log",
        "--access-log-fmt", GRANIAN_ACCESS_FORMAT,
        "person.app:create_app",
    ]  # fmt: skip


@contextlib.contextmanager
def serving(server: str, env: dict[str, str], scratch: Path) -> Iterator[tuple[int, object]]:
    """`server` running the person API; yields its port and process; stops it on the way out."""
    port = free_port()
    process = subprocess.Popen(
        server_command(server, port, scratch),
        env={**env, "PERSON_PORT": str(port)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,  # the access lines: written, not kept
        stderr=(scratch / f"{server}.log").open("wb"),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _healthy(port):
            if process.poll() is not None:
                raise MeasureError(f"{server} exited ({process.returncode}); see {scratch}")
            if time.monotonic() > deadline:
                raise MeasureError(f"{server} did not answer within {START_TIMEOUT}s")
            time.sleep(0.2)
        yield port, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # its workers too: they are in its session
            log.warning("%s did not stop on SIGTERM within 30 s; killed it", server)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _load(
    port: int, path: str, prefix: str, scratch: Path, seconds: float, meter: CpuMeter, server: str
) -> tuple[float, float]:
    """wrk on `path` (POST /person with CPFs from `prefix`, or a GET): requests per second, and
    CPU ms per request of the server's processes."""
    before = meter.snapshot()
    if path == "/person":
        got = wrk_post(port, prefix, scratch, CLIENTS, seconds)
    else:
        got = wrk_get(port, path, scratch, CLIENTS, seconds)
    cpu = CpuMeter.spent(before, meter.snapshot())[server]
    return got["rps"], cpu * 1000 / max(got["requests"], 1)


def measure(rounds: int, seconds: float) -> dict[str, float]:
    run_id = uuid.uuid4().hex[:8]
    scratch = Path(tempfile.mkdtemp(prefix=f"web-bench-{run_id}-"))
    env = {**stack_environment(f"web-{run_id}"), "LOG_LEVEL": "INFO"}
    best: dict[str, float] = {}

    def keep(name: str, value: float, better: Callable[[float, float], float]) -> None:
        best[name] = better(best[name], value) if name in best else value

    with fresh_database(f"bench_web_{run_id}") as db_url:
        env["PERSON_DATABASE_URL"] = db_url
        migrate_database(db_url)
        with contextlib.ExitStack() as running:
            ports = {}
            meters = {}
            for index, server in enumerate(SERVERS):
                ports[server], process = running.enter_context(serving(server, env, scratch))
                meters[server] = CpuMeter(SimpleNamespace(processes={server: process}))
                # CPFs 5<server><round>...: 9 is the warm-up's
                wrk_post(ports[server], f"5{index}9", scratch, CLIENTS, WARMUP_SECONDS)
            for round_ in range(rounds):
                order = SERVERS if round_ % 2 == 0 else SERVERS[::-1]
                for server in order:
                    port, meter = ports[server], meters[server]
                    prefix = f"5{SERVERS.index(server)}{round_}"
                    for kind, path in (("post", "/person"), ("health", "/health")):
                        rps, cpu_ms = _load(port, path, prefix, scratch, seconds, meter, server)
                        log.info(
                            "round %d %s %s: %.0f/s, %.2f CPU ms per request",
                            round_ + 1, server, kind, rps, cpu_ms,
                        )  # fmt: skip
                        rps_name = "post_person_rps" if kind == "post" else "health_rps"
                        keep(f"{server}_{rps_name}", rps, max)
                        keep(f"{server}_{kind}_cpu_ms", cpu_ms, min)
    shutil.rmtree(scratch, ignore_errors=True)
    best["granian_vs_gunicorn_ratio"] = (
        best["granian_post_person_rps"] / best["gunicorn_post_person_rps"]
    )
    best["granian_vs_gunicorn_health_ratio"] = (
        best["granian_health_rps"] / best["gunicorn_health_rps"]
    )
    return best


def main(argv: list[str] | None = None) -> int:
    """Measure and print the figures; 1 if they could not be measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"default {ROUNDS} (max 9)")
    parser.add_argument("--seconds", type=float, default=SECONDS, help=f"default {SECONDS:.0f}")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 9:
        parser.error("--rounds must be 1..9 (one CPF digit each)")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    need_wrk()
    signal.signal(signal.SIGTERM, interrupted)  # run the clean-ups, as on Ctrl-C
    try:
        figures = measure(args.rounds, args.seconds)
    except Exception as exc:
        log.error("web server benchmark: not measured (%s: %s)", type(exc).__name__, exc)
        return 1
    for server in SERVERS:
        print(f"{server}_post_person_rps: {figures[f'{server}_post_person_rps']:.0f}")
        print(f"{server}_post_cpu_ms: {figures[f'{server}_post_cpu_ms']:.2f}")
        print(f"{server}_health_rps: {figures[f'{server}_health_rps']:.0f}")
        print(f"{server}_health_cpu_ms: {figures[f'{server}_health_cpu_ms']:.2f}")
    print(f"granian_vs_gunicorn_ratio: {figures['granian_vs_gunicorn_ratio']:.2f}")
    print(f"granian_vs_gunicorn_health_ratio: {figures['granian_vs_gunicorn_health_ratio']:.2f}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
