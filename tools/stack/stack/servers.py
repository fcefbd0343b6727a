"""The servers `make up` needs, and a container for each that does not answer: STACK_SERVERS.

    local        use the servers at the URLs; stack.check_servers names any that does not answer
    containers   run PostgreSQL, RabbitMQ and Redis in containers of the stack's own
    auto         (the default) a container only for a server that does not answer at its URL

A container is started for a server on this machine (127.0.0.1, localhost or ::1) on the port
its URL names, published on 127.0.0.1 only, with the user, password and virtual host of the URL
(PostgreSQL trusts connections when the URL has no password, as a development server on this
machine does), from the `*_IMAGE` image (the environment, then `.env`, then docker-compose.yml's
pinned tag; `make images-offline` builds stand-ins where no registry answers), on a network of
the stack's own, its data in a named volume that `make down` keeps: the next `make up` finds it
again. Several URLs naming one host and port share one server (the person, notifier and console
databases). Containers carry the stack's run directory as a label, so `make down` stops and
removes what this stack started, and nothing else.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from stack.check_servers import KINDS, hide_password
from stack.images_offline import official_images

MODES = ("auto", "local", "containers")
LABEL = "org.event-replication.stack"  # the run directory of the stack that started it
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
READY_TIMEOUT = 180.0  # RabbitMQ's first start on a slow machine
STOP_TIMEOUT = 60  # seconds docker stop waits for a server to shut down cleanly


@dataclass(frozen=True)
class Kind:
    title: str
    image_variable: str
    port: int  # the server's port in the container
    data: str  # where it keeps its data in the container
    start_hint: str  # how to start one without Docker


POSTGRES = Kind(
    "PostgreSQL",
    "POSTGRES_IMAGE",
    5432,
    "/var/lib/postgresql/data",
    KINDS["postgresql"][1],
)
RABBITMQ = Kind("RabbitMQ", "RABBITMQ_IMAGE", 5672, "/var/lib/rabbitmq", KINDS["amqp"][1])
REDIS = Kind("Redis", "REDIS_IMAGE", 6379, "/data", KINDS["redis"][1])
# Schemes a container can stand in for (TLS ones cannot: the container would not speak it).
SCHEMES = {"postgresql": POSTGRES, "postgres": POSTGRES, "amqp": RABBITMQ, "redis": REDIS}


@dataclass
class Endpoint:
    """One server: a kind on a host and port, and the variables whose URLs name it."""

    kind: Kind
    host: str
    port: int
    url: str  # the first URL naming it: the container takes its credentials
    variables: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The container's and its volume's name."""
        return f"event-replication-{self.kind.image_variable.split('_')[0].lower()}-{self.port}"

    @property
    def where(self) -> str:
        return f"{self.kind.title} on {self.host}:{self.port} ({', '.join(self.variables)})"


class Refused(Exception):
    """What the user must do before `make up` can go on (the message says it all)."""


def mode(env: dict[str, str]) -> str:
    chosen = env.get("STACK_SERVERS", "").strip() or "auto"
    if chosen not in MODES:
        raise Refused(f"STACK_SERVERS must be {', '.join(MODES)}; not {chosen!r}")
    return chosen


def endpoints(checks: Iterable[str]) -> tuple[list[Endpoint], list[str]]:
    """The servers a container could stand in for, from VARIABLE=URL pairs, one per host and
    port; and the variables no container can serve (another machine, a cluster, TLS, a socket)."""
    found: dict[tuple[Kind, int], Endpoint] = {}
    others = []
    for pair in checks:
        variable, _, url = pair.partition("=")
        parts = urlsplit(url) if "," not in url else None
        kind = SCHEMES.get(parts.scheme) if parts else None
        try:
            port = (parts.port if parts else None) or (kind.port if kind else 0)
        except ValueError:  # not a port: stack.check_servers says what is wrong with the URL
            port = 0
        if (
            not port
            or parts is None
            or kind is None
            or parts.hostname not in LOCAL_HOSTS
            or "host" in parse_qs(parts.query)  # libpq's host=/socket/dir overrides the URL's
        ):
            others.append(variable)
            continue
        endpoint = found.setdefault((kind, port), Endpoint(kind, parts.hostname, port, url))
        endpoint.variables.append(variable)
    return list(found.values()), others


def answers(host: str, port: int) -> bool:
    """Something accepts TCP connections there (the protocol is stack.check_servers' to check)."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# --- docker ------------------------------------------------------------------------------------


class Docker:
    """The docker command, run with the stack's environment (a DOCKER_HOST in .env counts)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.command = shutil.which("docker", path=env.get("PATH"))

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        assert self.command is not None
        return subprocess.run(
            [self.command, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def trouble(self) -> str | None:
        """None when an engine answers; otherwise what to install or start, exactly."""
        if self.command is None:
            return (
                "Docker is not installed. Install Docker Engine (Debian or Ubuntu: `sudo apt-get "
                "install docker.io`; elsewhere https://docs.docker.com/engine/install/), start it "
                "(`sudo systemctl start docker`) and run make up again."
            )
        try:
            done = self("info", "--format", "{{.ServerVersion}}", timeout=30)
        except subprocess.TimeoutExpired:
            return "The Docker engine did not answer `docker info` within 30 s: restart it."
        if done.returncode == 0 and done.stdout.strip():
            return None
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        reason = said[-1] if said else "no answer"
        if "permission denied" in reason.lower():
            return (
                f"docker may not use the engine ({reason}). Add yourself to the docker group "
                "(`sudo usermod -aG docker $USER`, then log in again) or run make up as root."
            )
        return (
            f"Docker is installed but no engine answers ({reason}). Start it (`sudo systemctl "
            "start docker`, or `sudo dockerd &` where there is no systemd) or point DOCKER_HOST "
            "at one, then run make up again."
        )

    def ours(self, run_dir: Path) -> dict[str, str]:
        """name → state ("running", "exited", ...) of the containers this stack started (none
        without an engine)."""
        if self.command is None:
            return {}
        done = self(
            "ps", "-a", "--filter", f"label={LABEL}={run_dir}", "--format", "{{.Names}}\t{{.State}}"
        )
        return dict(line.split("\t", 1) for line in done.stdout.splitlines() if "\t" in line)

    def ensure_image(self, image: str, variable: str) -> None:
        if self("image", "inspect", image).returncode == 0:
            return
        print(f"pulling {image} ({variable})")
        if self("pull", "--quiet", image, timeout=900).returncode != 0:
            raise Refused(
                f"{variable}={image} is not on this Docker engine and could not be pulled. "
                "Without a registry, `make -s images-offline >> .env` builds stand-ins from "
                "Debian's packages and names them there."
            )

    def runs(self, name: str) -> bool:
        done = self("inspect", "--format", "{{.State.Running}}", name)
        return done.stdout.strip() == "true"


def network_name(run_dir: Path) -> str:
    return f"event-replication-stack-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]}"


def image_for(kind: Kind, env: dict[str, str]) -> str:
    """The `*_IMAGE` variable (the environment or `.env`, merged by the caller) or compose's."""
    return env.get(kind.image_variable) or official_images()[kind.image_variable]


def run_arguments(endpoint: Endpoint, image: str, run_dir: Path) -> list[str]:
    """`docker run` for the endpoint: its URL's credentials, port on 127.0.0.1, data in a volume."""
    parts = urlsplit(endpoint.url)
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    settings: dict[str, str] = {}
    command: list[str] = []
    if endpoint.kind is POSTGRES:
        settings = {"POSTGRES_USER": user or "postgres", "POSTGRES_DB": "postgres"}
        if password:
            settings["POSTGRES_PASSWORD"] = password
        else:
            settings["POSTGRES_HOST_AUTH_METHOD"] = "trust"
    elif endpoint.kind is RABBITMQ:
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        settings = {
            "RABBITMQ_DEFAULT_USER": user or "guest",
            "RABBITMQ_DEFAULT_PASS": password or "guest",
            "RABBITMQ_DEFAULT_VHOST": vhost,
        }
    else:  # Redis: appendonly, so what it holds outlives the container, as in compose
        command = ["redis-server", "--appendonly", "yes"]
        if password:
            command += ["--requirepass", password]
    arguments = [
        "run",
        "--detach",
        "--name",
        endpoint.name,
        # RabbitMQ keeps its data under its node, rabbit@<hostname>: a fixed name finds it again.
        "--hostname",
        endpoint.name,
        "--label",
        f"{LABEL}={run_dir}",
        "--network",
        network_name(run_dir),
        "--publish",
        f"127.0.0.1:{endpoint.port}:{endpoint.kind.port}",
        "--volume",
        f"{endpoint.name}:{endpoint.kind.data}",
    ]
    for key, value in settings.items():
        arguments += ["--env", f"{key}={value}"]
    return [*arguments, image, *command]


# --- make up and make down ---------------------------------------------------------------------


def prepare(env: dict[str, str], checks: list[str], run_dir: Path) -> None:
    """Start a container for each server STACK_SERVERS says needs one, say which, and return once
    they answer; raise Refused with what to do when that cannot be done."""
    chosen = mode(env)
    if chosen == "local":
        return
    found, others = endpoints(checks)
    if chosen == "containers" and others:
        raise Refused(
            f"STACK_SERVERS=containers runs servers on this machine only, but {', '.join(others)} "
            "names another machine, a cluster, a socket or TLS: point it at 127.0.0.1 or use "
            "STACK_SERVERS=auto"
        )
    docker = Docker(env)
    running = docker.ours(run_dir)
    to_start = []
    print(f"servers (STACK_SERVERS={chosen}):")
    for endpoint in found:
        if running.get(endpoint.name) == "running":
            print(f"  {endpoint.where}: container {endpoint.name}, already running")
        elif answers(endpoint.host, endpoint.port):
            if chosen == "containers":
                raise Refused(
                    f"STACK_SERVERS=containers, but a server make up did not start answers on "
                    f"{endpoint.host}:{endpoint.port} ({', '.join(endpoint.variables)}): stop it, "
                    "point those URLs at a free port, or use STACK_SERVERS=auto to use it"
                )
            print(f"  {endpoint.where}: the server that answers there")
        else:
            to_start.append(endpoint)
    if not to_start:
        return
    trouble = docker.trouble()
    if trouble is not None:
        missing = "\n".join(
            f"  {e.kind.title} at {hide_password(e.url)} ({', '.join(e.variables)}); "
            f"without Docker: {e.kind.start_hint}"
            for e in to_start
        )
        raise Refused(
            f"These servers do not answer, and make up cannot start them in containers:\n"
            f"{missing}\n{trouble}\n"
            "Or start them yourself (or point the variables at them) and use STACK_SERVERS=local."
        )
    start(docker, to_start, run_dir, running)


def start(docker: Docker, to_start: list[Endpoint], run_dir: Path, running: dict) -> None:
    network = network_name(run_dir)
    if docker("network", "inspect", network).returncode != 0:
        made = docker("network", "create", "--label", f"{LABEL}={run_dir}", network)
        if made.returncode != 0:
            raise Refused(f"docker network create {network} failed: {made.stderr.strip()}")
    for endpoint in to_start:
        image = image_for(endpoint.kind, docker.env)
        docker.ensure_image(image, endpoint.kind.image_variable)
        if endpoint.name in running:  # stopped (the machine restarted): made again, same volume
            docker("rm", "--force", endpoint.name)
        new_volume = docker("volume", "inspect", endpoint.name).returncode != 0
        done = docker(*run_arguments(endpoint, image, run_dir))
        if done.returncode != 0:
            if endpoint.name in docker.ours(run_dir):  # made, but its port could not be published
                docker("rm", "--force", endpoint.name)
            if new_volume:
                docker("volume", "rm", endpoint.name)
            said = done.stderr.strip().splitlines()
            raise Refused(f"docker run for {endpoint.where} failed: {said[0] if said else '?'}")
        print(
            f"  {endpoint.where}: started container {endpoint.name} "
            f"({image}, 127.0.0.1:{endpoint.port}, data in volume {endpoint.name})"
        )
    await_ready(docker, to_start)


def await_ready(docker: Docker, started: list[Endpoint]) -> None:
    """Return once each server answers its URL (as stack.check_servers asks it)."""
    deadline = time.monotonic() + READY_TIMEOUT
    pending = list(started)
    while pending:
        for endpoint in list(pending):
            probe = KINDS[urlsplit(endpoint.url).scheme][0]
            try:
                probe(endpoint.url)
            except Exception as exc:
                if time.monotonic() > deadline or not docker.runs(endpoint.name):
                    logs = docker("logs", "--tail", "30", endpoint.name)
                    raise Refused(
                        f"{endpoint.where}: container {endpoint.name} did not answer "
                        f"({type(exc).__name__}); its last lines:\n{logs.stdout}{logs.stderr}"
                    ) from None
            else:
                pending.remove(endpoint)
        if pending:
            time.sleep(0.5)


def stop(env: dict[str, str], run_dir: Path) -> None:
    """Stop and remove the containers this stack started and its network; the volumes stay."""
    docker = Docker(env)
    names = sorted(docker.ours(run_dir))
    if names:
        docker("stop", "--time", str(STOP_TIMEOUT), *names, timeout=STOP_TIMEOUT + 60)
        docker("rm", "--force", *names)
        print(
            f"stopped and removed the containers {', '.join(names)}; their data stays in the "
            f"volumes of the same names (docker volume rm {' '.join(names)} deletes it)"
        )
    network = network_name(run_dir)
    if docker.command and docker("network", "inspect", network).returncode == 0:
        docker("network", "rm", network)


def describe(env: dict[str, str], run_dir: Path) -> list[str]:
    """`name: state` of each container this stack started (for make status)."""
    return [f"{name}: {state}" for name, state in sorted(Docker(env).ours(run_dir).items())]
