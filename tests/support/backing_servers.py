"""The PostgreSQL, RabbitMQ and Redis a test run uses: the local servers, or containers of its own.

`make test` needs no Docker. When an engine answers (and TEST_USE_CONTAINERS is not `no`), the run
starts the three in containers with testcontainers, from the images the `*_IMAGE` variables name
(defaults: the pinned tags of docker-compose.yml, so compose and the tests run the same servers),
on a network of its own, each port published on 127.0.0.1 only. Otherwise it uses the local servers
at TEST_DATABASE_URL, TEST_AMQP_URL and TEST_REDIS_URL.

Tests that stop the broker do it through `Servers.broker`: `rabbitmqctl stop_app/start_app` on the
local node, the container's own stop and start in containers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pika
from dotenv import dotenv_values
from stack.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
LOCAL = {
    "database": "postgresql://postgres@127.0.0.1:5432/postgres",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/%2F",
    "redis": "redis://127.0.0.1:6379/0",
}
RUN_LABEL = "event-replication.test-run"  # the pid of the pytest process that started it
BROKER_TIMEOUT = 180.0


class Broker(Protocol):
    """The session's RabbitMQ, as the fault tests stop and start it."""

    def stop(self) -> None: ...
    def start(self) -> None:
        """Start it again and return once it accepts AMQP connections."""
        ...

    def ensure_running(self) -> None: ...
    def queues(self) -> list[dict[str, Any]]:
        """`rabbitmqctl list_queues name type arguments` of the node, as JSON rows."""
        ...


@dataclass(frozen=True)
class Servers:
    database: str  # an admin URL; tests create their own databases through it
    amqp: str
    redis: str
    broker: Broker
    where: str  # "local" or "containers"


def _await_amqp(url: str, timeout: float = BROKER_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            pika.BlockingConnection(pika.URLParameters(url)).close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _queue_rows(out: str) -> list[dict[str, Any]]:
    rows = json.loads(out or "[]")
    for row in rows:
        if isinstance(row.get("arguments"), list):  # [[key, type, value], ...] on older nodes
            row["arguments"] = {key: value for key, _type, value in row["arguments"]}
    return rows


LIST_QUEUES = [
    "rabbitmqctl",
    "-q",
    "list_queues",
    "name",
    "type",
    "arguments",
    "--formatter",
    "json",
]


class LocalBroker:
    """The machine's RabbitMQ node: only its application is stopped, never the node."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _ctl(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120, check=check
        )
        return done.stdout

    def stop(self) -> None:
        if os.environ.get("PYTEST_XDIST_WORKER"):
            # Every test running beside this one shares the node: only a test marked serial,
            # which make test runs alone, may stop it.
            raise RuntimeError("a test that stops the local RabbitMQ must be marked serial")
        self._ctl("stop_app")

    def start(self) -> None:
        self._ctl("start_app")
        self._ctl("await_startup")
        _await_amqp(self.url)

    def ensure_running(self) -> None:
        self._ctl("start_app", check=False)
        self._ctl("await_startup")

    def queues(self) -> list[dict[str, Any]]:
        return _queue_rows(self._ctl(*LIST_QUEUES[2:]))


class ContainerBroker:
    """RabbitMQ in the run's container: stopped and started as a container (a whole node)."""

    def __init__(self, container: Any, url: str) -> None:
        self.container, self.url = container, url  # a docker SDK Container

    def stop(self) -> None:
        self.container.stop(timeout=60)

    def start(self) -> None:
        self.container.start()
        _await_amqp(self.url)

    def ensure_running(self) -> None:
        self.container.reload()
        if self.container.status != "running":
            self.start()

    def queues(self) -> list[dict[str, Any]]:
        code, out = self.container.exec_run(LIST_QUEUES)
        if code != 0:
            raise RuntimeError(f"list_queues in the container failed: {out.decode()[-500:]}")
        return _queue_rows(out.decode())


def local_servers() -> Servers:
    amqp = os.environ.get("TEST_AMQP_URL", LOCAL["amqp"])
    return Servers(
        database=os.environ.get("TEST_DATABASE_URL", LOCAL["database"]),
        amqp=amqp,
        redis=os.environ.get("TEST_REDIS_URL", LOCAL["redis"]),
        broker=LocalBroker(amqp),
        where="local",
    )


def images() -> dict[str, str]:
    """Each server's image, as compose takes it: the `*_IMAGE` variable from the environment,
    then from `.env`, then docker-compose.yml's pinned default (the one place the official tags
    are written)."""
    compose = (ROOT / "docker-compose.yml").read_text()
    dotenv = dotenv_values(ROOT / ".env") if (ROOT / ".env").exists() else {}
    found = {}
    for variable in ("POSTGRES_IMAGE", "RABBITMQ_IMAGE", "REDIS_IMAGE"):
        default = re.search(r"\$\{" + variable + r":-([^}]+)\}", compose)
        if default is None:
            raise RuntimeError(f"docker-compose.yml has no default for {variable}")
        found[variable] = os.environ.get(variable) or dotenv.get(variable) or default.group(1)
    return found


def ensure_images(names: dict[str, str]) -> None:
    """Pull what the engine lacks; name the way out when it cannot (no registry)."""
    import docker

    client = docker.from_env()
    try:
        for variable, image in names.items():
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                try:
                    client.images.pull(image)
                except docker.errors.APIError as exc:
                    raise RuntimeError(
                        f"{variable}={image} is not on this Docker engine and cannot be pulled "
                        f"({exc.explanation or exc}). Without a registry: `make -s images-offline "
                        ">> .env` builds stand-ins and names them; or run the tests against the "
                        "local servers with TEST_USE_CONTAINERS=no."
                    ) from None
    finally:
        client.close()


def docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
        return True
    except Exception:
        return False


def use_containers() -> bool:
    """TEST_USE_CONTAINERS: `yes` (an engine is required), `no`, or `auto` (when one answers)."""
    choice = os.environ.get("TEST_USE_CONTAINERS", "auto")
    if choice not in ("yes", "no", "auto"):
        raise RuntimeError(f"TEST_USE_CONTAINERS must be yes, no or auto, not {choice!r}")
    if choice == "no":
        return False
    answers = docker_answers()
    if choice == "yes" and not answers:
        raise RuntimeError("TEST_USE_CONTAINERS=yes but no Docker engine answers")
    return answers


def _publish(container: Any, port: int) -> int:
    """Publish the container's `port` on 127.0.0.1 only, on a fixed host port (a stopped and
    started container keeps it); return the host port."""
    host = free_port()
    container.ports[str(port)] = ("127.0.0.1", host)
    return host


def remove_leftovers() -> None:
    """Remove containers and networks of earlier runs whose pytest process is gone (a run killed
    before its fixtures could clean up)."""
    import docker

    client = docker.from_env()
    try:
        for kind in (client.containers, client.networks):
            listed = (
                kind.list(all=True, filters={"label": RUN_LABEL})
                if kind is client.containers
                else kind.list(filters={"label": RUN_LABEL})
            )
            for item in listed:
                pid = int(item.labels.get(RUN_LABEL, "0") or 0)
                if pid and _alive(pid):
                    continue
                with contextlib.suppress(Exception):
                    item.remove(force=True) if kind is client.containers else item.remove()
    finally:
        client.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def container_servers() -> Iterator[Servers]:
    """PostgreSQL, RabbitMQ and Redis in containers of this run, removed at the end."""
    # Ryuk, testcontainers' reaper, is an image of its own that an offline engine cannot pull:
    # the run removes its containers itself (here, and remove_leftovers after a killed run).
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    # Reach every container through its port published on 127.0.0.1, also when this run is
    # itself inside a container (testcontainers would otherwise use the bridge's gateway).
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.community.rabbitmq import RabbitMqContainer
    from testcontainers.community.redis import RedisContainer
    from testcontainers.core.network import Network

    remove_leftovers()
    image = images()
    ensure_images(image)
    labels = {RUN_LABEL: str(os.getpid())}
    password = secrets.token_hex(12)
    with Network(docker_network_kw={"labels": labels}) as network:
        pg = PostgresContainer(
            image["POSTGRES_IMAGE"],
            username="postgres",
            password=password,
            dbname="postgres",
            driver=None,
        )
        mq = RabbitMqContainer(image["RABBITMQ_IMAGE"], username="guest", password="guest")
        rd = RedisContainer(image["REDIS_IMAGE"])
        ports = {}
        for name, container, port in (("pg", pg, 5432), ("mq", mq, 5672), ("rd", rd, 6379)):
            container.with_network(network).with_kwargs(labels=labels)
            ports[name] = _publish(container, port)
        started: list[Any] = []
        try:
            with ThreadPoolExecutor(3) as pool:
                for future in [pool.submit(c.start) for c in (pg, mq, rd)]:
                    started.append(future.result())
            amqp = f"amqp://guest:guest@127.0.0.1:{ports['mq']}/%2F"
            yield Servers(
                database=f"postgresql://postgres:{password}@127.0.0.1:{ports['pg']}/postgres",
                amqp=amqp,
                redis=f"redis://127.0.0.1:{ports['rd']}/0",
                broker=ContainerBroker(mq.get_wrapped_container(), amqp),
                where="containers",
            )
        finally:
            for container in (pg, mq, rd):
                with contextlib.suppress(Exception):
                    container.stop()
