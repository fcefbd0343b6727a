"""Run the native stack: python -m stack.up up | down | logs | status (make up, down, logs, status).

`up` makes sure PostgreSQL, RabbitMQ and Redis answer (STACK_SERVERS=auto|local|containers:
a container for each that does not, stack.servers), creates the databases and applies migrations,
declares the consumers' queues, starts every process of the Procfile (honcho) in the background
and returns once each API's /health answers through Traefik. It is safe to run twice.
Configuration: the environment first, then `.env`, then the defaults (docs/configuration.md);
the copies of consumers, senders and relays from SCORE_CONSUMERS, NOTIFIER_CONSUMERS,
NOTIFIER_SENDERS and PERSON_RELAYS (processes.replicas), as honcho's concurrency.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from stack import ROOT, servers
from stack.processes import replicas

HOSTS = ("person", "score", "notifier", "console")
HEALTH_TIMEOUT = 90.0
STOP_TIMEOUT = 25.0


def environment() -> dict[str, str]:
    """The process environment, completed from .env without overriding what is set."""
    from dotenv import dotenv_values

    env = dict(os.environ)
    for key, value in dotenv_values(ROOT / ".env").items():
        if value is not None:
            env.setdefault(key, value)
    env.setdefault("GATEWAY_PORT", "8000")
    env.setdefault("EVENTS_EXCHANGE", "entity-changes")  # the exchange the stack runs on
    # The console calls each API directly, as any client would, on the ports make up gives them.
    for name, port in (("PERSON", 8101), ("SCORE", 8102), ("NOTIFIER", 8103)):
        own = env.get(f"{name}_PORT", str(port))
        env.setdefault(f"{name}_API_URL", f"http://127.0.0.1:{own}")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_dir(env: dict[str, str]) -> Path:
    path = Path(env.get("STACK_RUN_DIR", ROOT / ".run"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def running_pid(env: dict[str, str]) -> int | None:
    pid_file = run_dir(env) / "honcho.pid"
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


# The services whose consumers get queues on the exchange, and the servers each part needs:
# the composition names them, the shared library names none.
CONSUMERS = ("score", "notifier")


def server_checks(env: dict[str, str]) -> list[str]:
    """NAME=URL of every server, as each service's configuration reads it (its defaults
    included), for stack.check_servers."""
    code = (
        "from notifier.config import NotifierConfig; from person.config import PersonConfig; "
        "from score.config import ScoreConfig; from console.config import ConsoleConfig; "
        "p, s, n, c = PersonConfig(), ScoreConfig(), NotifierConfig(), ConsoleConfig(); "
        "print(f'PERSON_DATABASE_URL={p.person_database_url}'); "
        "print(f'NOTIFIER_DATABASE_URL={n.notifier_database_url}'); "
        "print(f'CONSOLE_DATABASE_URL={c.console_database_url}'); "
        "print(f'AMQP_URL={p.amqp_url}'); print(f'SCORE_REDIS_URL={s.score_redis_url}')"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if found.returncode != 0:
        print(found.stderr.strip().splitlines()[-1] if found.stderr else "bad configuration")
        raise SystemExit(1)
    # One per line: a keyword/value database URL (`host=a,b port=5432,5433 ...`) has spaces.
    return found.stdout.splitlines()


def prepare(env: dict[str, str]) -> None:
    """Servers answer (in containers where STACK_SERVERS says so), databases exist and are
    migrated, queues are declared."""
    checks = server_checks(env)
    try:
        servers.prepare(env, checks, run_dir(env))
    except servers.Refused as refused:
        print(refused)
        raise SystemExit(1) from None
    steps = [
        [sys.executable, "-m", "stack.check_servers", *checks],
        [sys.executable, "-m", "person.migrate"],
        [sys.executable, "-m", "notifier.migrate"],
        [sys.executable, "-m", "messaging.cli", "declare", *CONSUMERS],
    ]
    for step in steps:
        if subprocess.run(step, env=env, cwd=ROOT).returncode != 0:
            raise SystemExit(1)


def up(env: dict[str, str]) -> int:
    prepare(env)
    pid = running_pid(env)
    if pid is not None:
        print(f"the stack is already running (honcho pid {pid})")
    else:
        try:
            counts = replicas(env)
        except ValueError as exc:
            print(exc)
            return 2
        concurrency = ",".join(f"{name}={n}" for name, n in counts.items() if n > 1)
        log = open(run_dir(env) / "stack.log", "ab")  # noqa: SIM115 - honcho keeps it
        process = subprocess.Popen(
            [
                "honcho",
                "start",
                "-f",
                str(ROOT / "Procfile"),
                "-d",
                str(ROOT),
                *(["-c", concurrency] if concurrency else []),
            ],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        (run_dir(env) / "honcho.pid").write_text(str(process.pid))
        copies = ", ".join(f"{n} {name}" for name, n in counts.items() if n > 1)
        print(
            f"started the stack (honcho pid {process.pid}"
            f"{'; ' + copies if copies else ''}); logs: make logs"
        )
    if not wait_healthy(env):
        print(f"the stack did not become healthy; see {run_dir(env) / 'stack.log'}")
        return 1
    port = env["GATEWAY_PORT"]
    for host in HOSTS:
        print(f"  http://{host}.localhost:{port}/")
    if not env.get("API_KEYS"):
        print(
            "API_KEYS is not set: every route is open (development only). To close them:\n"
            "  .venv/bin/messaging apikey new --scopes person:write,person:read,score:read\n"
            "and put its API_KEYS entry in .env (docs/security.md)."
        )
    return 0


def wait_healthy(env: dict[str, str]) -> bool:
    """Poll each /health through Traefik until all answer 200 (or the processes die)."""
    deadline = time.monotonic() + HEALTH_TIMEOUT
    pending = list(HOSTS)
    while pending and time.monotonic() < deadline:
        if running_pid(env) is None:
            return False
        pending = [h for h in pending if not healthy(h, env["GATEWAY_PORT"])]
        if pending:
            time.sleep(0.2)
    return not pending


def healthy(host: str, port: str) -> bool:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/health", headers={"Host": f"{host}.localhost"}
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def down(env: dict[str, str]) -> int:
    stop_processes(env)
    servers.stop(env, run_dir(env))
    return 0


def stop_processes(env: dict[str, str]) -> None:
    pid = running_pid(env)
    if pid is None:
        print("the stack is not running")
        return
    os.killpg(pid, signal.SIGTERM)  # honcho and every process it started share this group
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and group_alive(pid):
        time.sleep(0.1)
    if group_alive(pid):
        print("some processes did not stop in time; killing them")
        os.killpg(pid, signal.SIGKILL)
    (run_dir(env) / "honcho.pid").unlink(missing_ok=True)
    print("stopped the stack; data stays in PostgreSQL and Redis")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def logs(env: dict[str, str]) -> int:
    log = run_dir(env) / "stack.log"
    if not log.exists():
        print("no logs yet: make up first")
        return 1
    return subprocess.call(["tail", "-n", "100", "-F", str(log)])


def status(env: dict[str, str]) -> int:
    pid = running_pid(env)
    print(f"honcho: {'pid ' + str(pid) if pid else 'not running'}")
    for host in HOSTS:
        print(f"{host}: {'healthy' if healthy(host, env['GATEWAY_PORT']) else 'not answering'}")
    for line in servers.describe(env, run_dir(env)):
        print(f"container {line}")
    return 0 if pid else 1


def main() -> int:
    commands = {"up": up, "down": down, "logs": logs, "status": status}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print(f"usage: {sys.argv[0]} {'|'.join(commands)}")
        return 2
    return commands[sys.argv[1]](environment())


if __name__ == "__main__":
    raise SystemExit(main())
