"""STACK_SERVERS: which servers `make up` runs in containers, how, and what it says when it cannot
(stack/servers.py). The containers themselves: tests/e2e/test_stack_containers.py."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from stack import servers

pytestmark = pytest.mark.unit

RUN_DIR = Path("/tmp/a-stack")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_urls_naming_one_server_share_its_container_and_others_get_none():
    found, others = servers.endpoints(
        [
            "PERSON_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/person",
            "NOTIFIER_DATABASE_URL=postgresql://postgres@localhost:5432/notifier",
            "CONSOLE_DATABASE_URL=postgresql://db.example:5432/console",
            "AMQP_URL=amqp://guest:guest@127.0.0.1:1/%2F,amqp://guest:guest@127.0.0.1:2/%2F",
            "SCORE_REDIS_URL=rediss://127.0.0.1:6380/0",
        ]
    )
    assert [(e.name, e.variables) for e in found] == [
        ("event-replication-postgres-5432", ["PERSON_DATABASE_URL", "NOTIFIER_DATABASE_URL"])
    ]
    assert others == ["CONSOLE_DATABASE_URL", "AMQP_URL", "SCORE_REDIS_URL"]


def test_a_container_takes_its_urls_credentials_and_publishes_on_127_0_0_1_only():
    (mq, rd, pg), _ = servers.endpoints(
        [
            "AMQP_URL=amqp://app:s%40cret@127.0.0.1:25673/events",
            "SCORE_REDIS_URL=redis://:pw@127.0.0.1/0",
            "PERSON_DATABASE_URL=postgresql://postgres@127.0.0.1:55432/person",
        ]
    )
    rabbitmq = servers.run_arguments(mq, "rabbitmq:x", RUN_DIR)
    assert "127.0.0.1:25673:5672" in rabbitmq
    assert "event-replication-rabbitmq-25673:/var/lib/rabbitmq" in rabbitmq
    assert {"RABBITMQ_DEFAULT_USER=app", "RABBITMQ_DEFAULT_PASS=s@cret"} <= set(rabbitmq)
    assert "RABBITMQ_DEFAULT_VHOST=events" in rabbitmq
    assert f"{servers.LABEL}={RUN_DIR}" in rabbitmq
    redis = servers.run_arguments(rd, "redis:x", RUN_DIR)
    assert "127.0.0.1:6379:6379" in redis
    assert redis[-6:] == ["redis:x", "redis-server", "--appendonly", "yes", "--requirepass", "pw"]
    postgres = servers.run_arguments(pg, "postgres:x", RUN_DIR)
    assert "POSTGRES_HOST_AUTH_METHOD=trust" in postgres  # no password in the URL
    assert "127.0.0.1:55432:5432" in postgres


def test_local_starts_nothing_and_asks_no_docker(tmp_path):
    env = {"STACK_SERVERS": "local", "PATH": str(tmp_path)}
    servers.prepare(env, [f"AMQP_URL=amqp://127.0.0.1:{closed_port()}/%2F"], RUN_DIR)


def test_an_unknown_mode_is_refused():
    with pytest.raises(servers.Refused, match="STACK_SERVERS must be auto, local, containers"):
        servers.prepare({"STACK_SERVERS": "docker"}, [], RUN_DIR)


def test_without_docker_make_up_says_what_to_install_and_how_to_start_each_server(tmp_path):
    port = closed_port()
    env = {"PATH": str(tmp_path)}  # no docker on it
    with pytest.raises(servers.Refused) as refused:
        servers.prepare(env, [f"AMQP_URL=amqp://app:s3cret@127.0.0.1:{port}/%2F"], RUN_DIR)
    said = str(refused.value)
    assert f"RabbitMQ at amqp://app:***@127.0.0.1:{port}/%2F (AMQP_URL)" in said
    assert "rabbitmq-server -detached" in said
    assert "Docker is not installed" in said
    assert "sudo apt-get install docker.io" in said
    assert "s3cret" not in said


@pytest.mark.skipif(shutil.which("docker") is None, reason="the docker command is not installed")
def test_with_docker_but_no_engine_make_up_says_to_start_it():
    port = closed_port()
    env = {"PATH": str(Path(shutil.which("docker")).parent), "DOCKER_HOST": "unix:///nowhere"}
    with pytest.raises(servers.Refused) as refused:
        servers.prepare(env, [f"SCORE_REDIS_URL=redis://127.0.0.1:{port}/0"], RUN_DIR)
    assert "Docker is installed but no engine answers" in str(refused.value)
    assert "sudo systemctl start docker" in str(refused.value)


def test_containers_refuses_a_server_it_did_not_start(tmp_path):
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        env = {"STACK_SERVERS": "containers", "PATH": str(tmp_path)}
        with pytest.raises(
            servers.Refused, match=f"make up did not start answers on 127.0.0.1:{port}"
        ):
            servers.prepare(env, [f"SCORE_REDIS_URL=redis://127.0.0.1:{port}/0"], RUN_DIR)
