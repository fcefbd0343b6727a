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
from collections.abc import Iterator
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
                return response.status, _decode(response.read()), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read()), dict(exc.headers)

    def control(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "stack.py"), command],
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
def stack(stack_env, tmp_path_factory) -> Iterator[Stack]:
    env = {**stack_env, "STACK_RUN_DIR": str(tmp_path_factory.mktemp("stack"))}
    stack = Stack(int(env["GATEWAY_PORT"]), env, Path(env["STACK_RUN_DIR"]))
    started = stack.control("up")
    if started.returncode != 0:
        log = stack.run_dir / "stack.log"
        tail = log.read_text()[-4000:] if log.exists() else ""
        stack.control("down")
        pytest.fail(f"make up failed:\n{started.stdout}\n{started.stderr}\n{tail}")
    yield stack
    stack.control("down")
