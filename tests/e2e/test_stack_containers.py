"""`make up` where PostgreSQL, RabbitMQ and Redis do not answer: with STACK_SERVERS=containers it
starts each in a container (the `*_IMAGE` images), the README's walkthrough works unchanged through
its Traefik, and `make down` leaves no container; the volumes keep the data for the next `make up`.

Runs when the test run uses containers (an engine answers and TEST_USE_CONTAINERS is not `no`).
The servers get ports of their own (on 127.0.0.1, as the URLs name them), the stack a run
directory, ports and a network of its own; whatever happens, the test removes its containers,
volumes and network at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from backing_servers import use_containers
from stack.processes import Gateway, free_port
from stack.servers import LABEL, network_name
from walkthrough import check_walkthrough_outcome, run_walkthrough

pytestmark = [pytest.mark.e2e, pytest.mark.containers]

ROOT = Path(__file__).resolve().parents[2]
IMAGE_VARIABLES = ("POSTGRES_IMAGE", "RABBITMQ_IMAGE", "REDIS_IMAGE")
SERVERS = {"postgres": "PostgreSQL", "rabbitmq": "RabbitMQ", "redis": "Redis"}


@dataclass
class NewUser:
    """A checkout's `make` with nothing but PATH, HOME, STACK_SERVERS and the servers' ports."""

    env: dict[str, str]
    run_dir: Path
    ports: dict[str, int]  # kind → the port its URL names

    def make(self, target: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "-s", target],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    def containers(self) -> list[str]:
        """The names of the containers, running or not, `make up` made for this stack."""
        listed = subprocess.run(
            ["docker", "ps", "-a", "--filter", f"label={LABEL}={self.run_dir}"],
            capture_output=True,
            text=True,
            check=True,
        )
        return listed.stdout.splitlines()[1:]

    def names(self) -> list[str]:
        return [f"event-replication-{kind}-{port}" for kind, port in self.ports.items()]

    def get(self, host: str, path: str) -> tuple[int, object]:
        status, raw = Gateway(int(self.env["GATEWAY_PORT"])).call("GET", host, path)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")


@pytest.fixture
def new_user(tmp_path) -> Iterator[NewUser]:
    if not use_containers():
        pytest.skip("make up's containers are tried when the test run uses containers")
    ports = {kind: free_port() for kind in SERVERS}
    database = f"postgresql://postgres@127.0.0.1:{ports['postgres']}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "STACK_SERVERS": "containers",
        "STACK_RUN_DIR": str(tmp_path / "run"),
        "PERSON_DATABASE_URL": f"{database}/person",
        "NOTIFIER_DATABASE_URL": f"{database}/notifier",
        "CONSOLE_DATABASE_URL": f"{database}/console",
        "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{ports['rabbitmq']}/%2F",
        "SCORE_REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0",
        # The native processes' own ports, free here (a developer's make up may hold 8000-8104).
        **{
            name: str(free_port())
            for name in ("GATEWAY_PORT", "PERSON_PORT", "SCORE_PORT", "NOTIFIER_PORT")
        },
        "CONSOLE_PORT": str(free_port()),
        **{name: os.environ[name] for name in IMAGE_VARIABLES if os.environ.get(name)},
    }
    user = NewUser(env, tmp_path / "run", ports)
    try:
        yield user
    finally:
        user.make("down")
        left = [line.split()[-1] for line in user.containers()]  # only if make down failed
        if left:
            subprocess.run(["docker", "rm", "--force", *left], capture_output=True, check=False)
        names = user.names()
        subprocess.run(["docker", "volume", "rm", *names], capture_output=True, check=False)
        network = network_name(user.run_dir)
        subprocess.run(["docker", "network", "rm", network], capture_output=True, check=False)


def test_make_up_with_containers_runs_the_walkthrough_and_make_down_leaves_no_container(
    new_user,
):
    """As a new user would: make up, the walkthrough, make down; then make up again on the data
    the volumes kept, and make down."""
    up = new_user.make("up")
    assert up.returncode == 0, up.stdout + up.stderr
    for kind, title in SERVERS.items():  # make up says which server runs where
        port = new_user.ports[kind]
        assert f"{title} on 127.0.0.1:{port}" in up.stdout
        assert f"started container event-replication-{kind}-{port}" in up.stdout, up.stdout
    assert len(new_user.containers()) == 3

    run_walkthrough(int(new_user.env["GATEWAY_PORT"]))
    check_walkthrough_outcome(new_user.get)

    down = new_user.make("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert new_user.containers() == []

    # The volumes stay: the next make up starts new containers on the same data.
    again = new_user.make("up")
    assert again.returncode == 0, again.stdout + again.stderr
    status, person = new_user.get("person", "/person/12345678909")
    assert status == 200 and person["status"] == "active", person
    assert new_user.get("score", "/12345678909/score")[1]["score"] == 4970

    down = new_user.make("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert new_user.containers() == []
