"""The Procfile's processes under direct control, for the fault run and the benchmark.

`make up` runs the Procfile through honcho (scripts/stack.py), which stops everything when one
process exits. The fault run has to kill single processes and start them again, and the benchmark
has to start the relay late and read each process's memory: both use `Processes`, which starts
each Procfile command in a process group of its own (so a signal reaches its children too, as
gunicorn's workers), and `Gateway`, keep-alive HTTP through Traefik.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def procfile_commands() -> dict[str, str]:
    """name → command of each Procfile line, in the file's order."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and line[0] != "#")


class Processes:
    """Procfile processes, each in a process group of its own, logging to log_dir/<name>.log."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.commands = procfile_commands()
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
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
        for name in self.commands:
            if name not in but:
                self.start(name)

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

    def call(self, method: str, host: str, path: str, body: object = None) -> tuple[int, bytes]:
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
                    headers={"Host": f"{host}.localhost", "Content-Type": "application/json"},
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
