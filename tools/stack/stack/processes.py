"""The Procfile's processes under direct control, for the fault run and the benchmark.

`make up` runs the Procfile through honcho (python -m stack.up), which stops everything when one
process exits. The fault run has to kill single processes and start them again, and the benchmark
has to start the relay late and read each process's memory: both use `Processes`, which starts
each Procfile command in a process group of its own (so a signal reaches its children too, as
gunicorn's workers), and `Gateway`, keep-alive HTTP through Traefik.

Consumers, senders and the relay can run as several replicas (`replicas()`: SCORE_CONSUMERS,
NOTIFIER_CONSUMERS, NOTIFIER_SENDERS, PERSON_RELAYS; `make up` passes the same counts to
honcho). A process that runs once keeps its Procfile name; copies are named as honcho names
them, `score-consumer.1`, `score-consumer.2`, ...
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from stack import ROOT

# Ports handed out by free_port in this process: never the same one twice.
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()
_LOWEST_PICKED = 20000  # above the ports people run services on (8000s, 15672, ...)
_WIDE_ENOUGH = 1000  # a band of ports narrower than this is not worth picking from


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (Linux: 32768-60999)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _band() -> range | None:
    """Ports outside the range for outgoing connections: below it (from _LOWEST_PICKED), else
    above it; None where neither band is wide enough (a range of 1024-65535)."""
    low, high = _ephemeral_range()
    if low - _LOWEST_PICKED >= _WIDE_ENOUGH:
        return range(_LOWEST_PICKED, low)
    if 65535 - high >= _WIDE_ENOUGH:
        return range(max(high + 1, _LOWEST_PICKED), 65536)
    return None


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on, for a server about to be started on it.

    It is taken outside the kernel's range of ports for outgoing connections: a port from that
    range (what binding port 0 returns) can be taken between this call and the server's bind by
    any connection some other process opens, and on a busy machine one was (gunicorn: Address
    already in use). Ports are tried from a random start, each checked by binding it, and one
    process never hands out the same port twice. Where the range leaves no band wide enough,
    the kernel chooses (the race is back there, the repeats are not)."""
    band = _band()
    with _HANDED_OUT_LOCK:
        if band is None:
            for _ in range(1000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                if port not in _HANDED_OUT:
                    _HANDED_OUT.add(port)
                    return port
            raise RuntimeError("the kernel gave only ports handed out already")
        start = secrets.randbelow(
            len(band)
        )  # not `random`: a test may seed it alike in two workers
        for step in range(len(band)):
            port = band[(start + step) % len(band)]
            if port not in _HANDED_OUT and _bindable(port):
                _HANDED_OUT.add(port)
                return port
    raise RuntimeError(f"no free port of 127.0.0.1 in {band.start}-{band.stop - 1}")


def procfile_commands() -> dict[str, str]:
    """name → command of each Procfile line, in the file's order."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and line[0] != "#")


# The Procfile entries that can run as several copies, and the variable that says how many.
# Consumers share their work queue, senders claim each delivery, and of several relays the
# advisory lock makes one active while the others wait as standbys.
REPLICA_VARIABLES = {
    "person-relay": "PERSON_RELAYS",
    "score-consumer": "SCORE_CONSUMERS",
    "notifier-consumer": "NOTIFIER_CONSUMERS",
    "notifier-sender": "NOTIFIER_SENDERS",
}


def replicas(env: dict[str, str]) -> dict[str, int]:
    """Copies of each Procfile entry the environment asks for (1 where it says nothing)."""
    counts = dict.fromkeys(procfile_commands(), 1)
    for name, variable in REPLICA_VARIABLES.items():
        raw = env.get(variable, "").strip() or "1"
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{variable} must be a whole number of at least 1, not {raw!r}")
        counts[name] = int(raw)
    return counts


def copy_names(name: str, count: int) -> list[str]:
    """The names of a Procfile entry's copies: its own name if it runs once."""
    return [name] if count == 1 else [f"{name}.{n}" for n in range(1, count + 1)]


def entry(name: str) -> str:
    """The Procfile entry a copy's name belongs to (score-consumer.2 → score-consumer)."""
    return name.partition(".")[0]


class Processes:
    """Procfile processes, each in a process group of its own, logging to log_dir/<name>.log;
    as many copies of each as `counts` (by default the environment's, `replicas(env)`) says."""

    def __init__(
        self, env: dict[str, str], log_dir: Path, counts: dict[str, int] | None = None
    ) -> None:
        self.env, self.log_dir = env, log_dir
        counts = counts if counts is not None else replicas(env)
        self.commands = {
            copy: command
            for name, command in procfile_commands().items()
            for copy in copy_names(name, counts.get(name, 1))
        }
        self.processes: dict[str, subprocess.Popen] = {}

    def copies(self, name: str) -> list[str]:
        """The running names of a Procfile entry (or of one copy: itself)."""
        if name in self.commands:
            return [name]
        return [copy for copy in self.commands if entry(copy) == name]

    def start(self, name: str) -> None:
        """Start a process: one copy by its name, or every copy of a Procfile entry."""
        names = self.copies(name)
        if not names:
            raise KeyError(f"no process {name!r} in the Procfile")
        for copy in names:
            self._start(copy)

    def _start(self, name: str) -> None:
        with (self.log_dir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                ["sh", "-c", f"exec {self.commands[name]}"],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_all(self, but: tuple[str, ...] = ()) -> None:
        """Start every process but those named (entries, or single copies)."""
        for name in self.commands:
            if name not in but and entry(name) not in but:
                self._start(name)

    def kill(self, name: str) -> None:
        process = self.processes[name]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def restart(self, name: str) -> None:
        self.kill(name)
        self.start(name)

    def exited(self) -> dict[str, int]:
        """The processes that have exited, with their return codes."""
        return {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}

    def stop_all(self, timeout: float = 20.0) -> dict[str, str]:
        """SIGTERM every group, SIGKILL what is left after `timeout`; return what was killed."""
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        killed = {}
        for name, process in self.processes.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed[name] = f"did not stop within {timeout}s"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        return killed

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for name in self.commands:
            path = self.log_dir / f"{name}.log"
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            parts.append(f"--- {name}\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)


class Gateway:
    """Keep-alive HTTP through Traefik, one connection per thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()

    def call(
        self,
        method: str,
        host: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        for attempt in range(2):  # a keep-alive connection the gateway closed is opened again
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=30
                )
            try:
                conn.request(
                    method,
                    path,
                    body=None if body is None else json.dumps(body),
                    headers={
                        "Host": f"{host}.localhost",
                        "Content-Type": "application/json",
                        **(headers or {}),
                    },
                )
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def post(self, host: str, path: str, body: object) -> tuple[int, bytes]:
        return self.call("POST", host, path, body)
