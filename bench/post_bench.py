"""What a registration costs, and POST /person as users feel it (bench/README.md, step `cost`).

- `open_loop`: an open-loop HTTP client. Request i is due at t0 + i/rate whatever happened to
  the others, and its latency runs from that due time (a request that waits for a connection or
  behind a slow one counts that wait), so a slow stack cannot slow the clock that measures it.
- `CpuMeter`: CPU seconds of every process of the stack: each Procfile process with its
  children, and PostgreSQL, RabbitMQ and Redis (their processes on this machine, by user and
  name), from /proc; processes that end meanwhile are counted through their parent's
  cutime/cstime.
- `measure_alone`: the ceiling and the naive design (bench/post_apps.py) under the same gunicorn
  settings behind the same Traefik, measured with wrk while nothing else of the stack runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import psycopg
from psycopg import sql
from stack.processes import Processes, free_port

ROOT = Path(__file__).resolve().parent.parent
CLOCK = os.sysconf("SC_CLK_TCK")
OPEN_LOOP_CONNECTIONS = 64
SERVERS = ("postgresql", "rabbitmq", "redis")

log = logging.getLogger("bench.post")


class MeasureError(RuntimeError):
    """A figure could not be measured."""


# -- open-loop load ----------------------------------------------------------------------------
async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes
) -> int:
    writer.write(head + body)
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def _open_loop(
    port: int, host: str, path: str, bodies: list[bytes], rate: float
) -> tuple[list[float], int]:
    free: asyncio.Queue = asyncio.Queue()
    for _ in range(OPEN_LOOP_CONNECTIONS):
        free.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    latencies: list[float] = []
    failures = 0
    loop = asyncio.get_running_loop()

    async def one(body: bytes, due: float) -> None:
        nonlocal failures
        reader, writer = await free.get()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            status = await _request(reader, writer, head, body)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            failures += 1
            writer.close()
            free.put_nowait(await asyncio.open_connection("127.0.0.1", port))
            return
        if status == 201:
            latencies.append((loop.time() - due) * 1000)
        else:
            failures += 1
        free.put_nowait((reader, writer))

    start = loop.time() + 0.05
    tasks = []
    for i, body in enumerate(bodies):
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        tasks.append(asyncio.create_task(one(body, due)))
    await asyncio.gather(*tasks)
    while not free.empty():
        free.get_nowait()[1].close()
    return latencies, failures


def open_loop(
    port: int, host: str, path: str, bodies: list[dict[str, Any]], rate: float
) -> tuple[list[float], int]:
    """POST each body at `rate` per second (open loop); latencies in ms of the 201s, failures."""
    encoded = [json.dumps(body).encode() for body in bodies]
    return asyncio.run(_open_loop(port, f"{host}.localhost", path, encoded, rate))


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# -- CPU accounting ----------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, str, int, float] | None:
    """(ppid, comm, uid, CPU seconds: own and reaped children's) of a process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        uid = Path(f"/proc/{pid}").stat().st_uid
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw.rpartition(")")[2].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return int(fields[1]), comm, uid, ticks / CLOCK


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class CpuMeter:
    """CPU seconds per part of the stack: each Procfile entry (copies and children together)
    and the three servers."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes

    def snapshot(self) -> dict[str, float]:
        stats = {
            int(p.name): s
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            if (s := _stat(int(p.name))) is not None
        }
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_rest) in stats.items():
            children.setdefault(ppid, []).append(pid)
        used: dict[str, float] = dict.fromkeys(SERVERS, 0.0)
        for _ppid, comm, uid, cpu in stats.values():
            user = _user(uid)
            if user == "postgres":
                used["postgresql"] += cpu
            elif user == "rabbitmq":
                used["rabbitmq"] += cpu
            elif comm == "redis-server":
                used["redis"] += cpu
        for name, process in self.processes.processes.items():
            part = name.partition(".")[0]  # copies of one entry add up
            todo = [process.pid]
            while todo:
                pid = todo.pop()
                if pid in stats:
                    used[part] = used.get(part, 0.0) + stats[pid][3]
                    todo += children.get(pid, [])
        return used

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: after[name] - before.get(name, 0.0) for name in after}


# -- the ceiling and the naive design, alone ---------------------------------------------------
WRK_SCRIPT = """
-- POST /person with a CPF no other request of this run uses: the prefix given after `--`,
-- the wrk thread, a counter.
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
function init(args)
  prefix = args[1]
  n = 0
end
function request()
  n = n + 1
  local cpf = string.format("%s%d%07d", prefix, tid, n)
  local body = string.format(
    '{"cpf":"%s","name":"Bench Person %d","address":"Rua da Aurora, %d, Recife",'
    .. '"date_of_birth":"1990-04-12","email":"p%s@bench.example"}', cpf, n, n % 2000 + 1, cpf)
  return wrk.format("POST", "/person", nil, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d status_errors=%d socket_errors=%d p99_us=%d\\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(99)))
end
"""


def need_wrk() -> None:
    if not shutil.which("wrk"):
        raise SystemExit(
            "make bench needs wrk for its HTTP load (a Python client would take CPU from the "
            "stack it measures): apt-get install --no-install-recommends wrk"
        )


def wrk_post(
    port: int, prefix: str, scratch: Path, clients: int, seconds: float
) -> dict[str, float]:
    """POST /person through Traefik with wrk: requests/s that succeeded, and wrk's p99 (ms)."""
    script = scratch / "post_person.lua"
    script.write_text(WRK_SCRIPT)
    command = [
        "wrk", "-t2", f"-c{clients}", f"-d{seconds:.0f}s", "--timeout", "10s",
        "-H", "Host: person.localhost", "-H", "Content-Type: application/json",
        "-s", str(script), f"http://127.0.0.1:{port}/person", "--", prefix,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise MeasureError(f"wrk failed ({done.returncode}): {done.stdout} {done.stderr}")
    got = {k: int(v) for k, v in (pair.split("=") for pair in line.split()[1:])}
    failed = got["status_errors"] + got["socket_errors"]
    log.info("wrk: %d requests, %d failed", got["requests"], failed)
    if failed > got["requests"] // 100:
        raise MeasureError(f"{failed} of {got['requests']} requests failed")
    return {
        "rps": (got["requests"] - failed) / (got["duration_us"] / 1e6),
        "p99_ms": got["p99_us"] / 1000,
    }


@contextlib.contextmanager
def _database(admin_url: str, name: str) -> Iterator[str]:
    base = admin_url.rpartition("/")[0]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextlib.contextmanager
def naive_exchange(amqp_url: str, exchange: str) -> Iterator[list[str]]:
    """A fanout exchange bound to two quorum queues, as the stack's (the score's and the
    notifier's; nobody consumes them in `measure_alone`): the broker stores each message twice.
    Yields the two queues' names."""
    queues = [f"{exchange}.{n}" for n in (1, 2)]
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = conn.channel()
    channel.exchange_declare(exchange, "fanout", durable=True)
    for queue in queues:
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(queue, exchange)
    conn.close()
    try:
        yield queues
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = conn.channel()
        for queue in queues:
            channel.queue_delete(queue)
        channel.exchange_delete(exchange)
        conn.close()


def measure_alone(
    kind: str, env: dict[str, str], admin_url: str, clients: int, seconds: float
) -> float:
    """POST /person requests per second of post_apps.<kind>() behind the stack's Traefik, with
    nothing else of the stack running."""
    run_id = uuid.uuid4().hex[:8]
    scratch = Path(tempfile.mkdtemp(prefix=f"post-{kind}-{run_id}-"))
    exchange = f"bench-naive-{run_id}"
    with (
        _database(admin_url, f"bench_{kind}_{run_id}") as db_url,
        naive_exchange(env["AMQP_URL"], exchange) if kind == "naive" else contextlib.nullcontext(),
        app_behind_gateway(kind, env, db_url, exchange, scratch) as (port, _processes),
    ):
        got = wrk_post(port, f"7{kind[0]}", scratch, clients, seconds)
    shutil.rmtree(scratch, ignore_errors=True)
    log.info("%s: %.0f requests/s, p99 %.1f ms", kind, got["rps"], got["p99_ms"])
    return got["rps"]


@contextlib.contextmanager
def app_behind_gateway(
    kind: str, env: dict[str, str], db_url: str, exchange: str, scratch: Path
) -> Iterator[tuple[int, dict[str, subprocess.Popen]]]:
    """post_apps.<kind>() under gunicorn with the person API's settings, on a database of its own
    (its table made here) and publishing to `exchange` (the naive app), behind the stack's
    Traefik (the Procfile's command) as person.localhost. Yields the gateway's port and the two
    processes (`traefik`, `app`); stops both on the way out."""
    from post_apps import prepare

    prepare(db_url)
    app_port = free_port()
    app_env = {
        **env,
        "BENCH_APP_PORT": str(app_port),
        "BENCH_APP_DATABASE_URL": db_url,
        "BENCH_APP_EXCHANGE": exchange,
        "PERSON_PORT": str(app_port),  # Traefik's person.localhost route leads to the app
        "PYTHONPATH": str(ROOT / "bench"),
    }
    gateway = Processes(app_env, scratch, counts={"traefik": 1})
    app = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn", "-c", str(ROOT / "bench" / "post_apps.conf.py"),
            f"post_apps:{kind}()",
        ],
        env=app_env, cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=(scratch / "app.log").open("wb"), start_new_session=True,
    )  # fmt: skip
    try:
        gateway.start("traefik")
        port = int(app_env["GATEWAY_PORT"])
        _wait_answering(port, app)
        yield port, {"traefik": gateway.processes["traefik"], "app": app}
    finally:
        app.terminate()
        app.wait(timeout=30)
        gateway.stop_all()


def _wait_answering(port: int, app: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until a POST through Traefik reaches the app (a 4xx for a body it cannot take is fine)."""
    import http.client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise MeasureError(f"the app exited ({app.returncode})")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        try:
            conn.request("GET", "/person", headers={"Host": "person.localhost"})
            if conn.getresponse().status == 405:  # the app's answer, not Traefik's 502/404
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise MeasureError(f"the app did not answer through Traefik within {timeout}s")


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise MeasureError(f"{what}: not within {timeout}s")
        time.sleep(interval)
