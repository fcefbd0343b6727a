"""The whole native stack (the Procfile `make up` runs, with real Traefik), per test module.

It runs on ports, databases, an exchange and a Redis key prefix of its own, so it never meets a
stack a developer started with `make up`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    port: int
    env: dict[str, str]
    run_dir: Path

    def call(
        self,
        method: str,
        host: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        """An HTTP request through Traefik, as curl http://<host>.localhost:<port><path>."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={
                "Host": f"{host}.localhost",
                "Content-Type": "application/json",
                **(headers or {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, _decode(response.read()), response.headers
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read()), exc.headers

    def control(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "stack.up", command],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


@pytest.fixture(scope="module")
def start_stack(stack_env, tmp_path_factory) -> Iterator[Callable[..., Stack]]:
    """Start this module's stack with `make up`, its environment changed by the overrides
    (a value of None removes a variable); stopped with `make down` after the module."""
    started: list[Stack] = []

    def start(**overrides: str | None) -> Stack:
        env = {**stack_env, "STACK_RUN_DIR": str(tmp_path_factory.mktemp("stack"))}
        for name, value in overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        stack = Stack(int(env["GATEWAY_PORT"]), env, Path(env["STACK_RUN_DIR"]))
        started.append(stack)
        up = stack.control("up")
        if up.returncode != 0:
            log = stack.run_dir / "stack.log"
            tail = log.read_text()[-4000:] if log.exists() else ""
            pytest.fail(f"make up failed:\n{up.stdout}\n{up.stderr}\n{tail}")
        return stack

    yield start
    for stack in started:
        stack.control("down")


@pytest.fixture(scope="module")
def stack(start_stack) -> Stack:
    return start_stack()
