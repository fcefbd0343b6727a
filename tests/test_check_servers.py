"""`make up` names the server that did not answer, with its URL (password hidden) and a hint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from urllib.parse import quote

import pytest
from local_sockets import socket_url
from own_servers import own_redis_socket
from psycopg.conninfo import conninfo_to_dict

pytestmark = pytest.mark.integration


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def check(**urls: str) -> subprocess.CompletedProcess:
    """The checks as the stack script passes them: NAME=URL, the kind from the scheme."""
    return subprocess.run(
        [sys.executable, "-m", "stack.check_servers", *(f"{k}={v}" for k, v in urls.items())],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_server_answering_passes(servers):
    result = check(
        PERSON_DATABASE_URL=servers.database,
        NOTIFIER_DATABASE_URL=servers.database,
        AMQP_URL=servers.amqp,
        SCORE_REDIS_URL=servers.redis,
    )
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("✓") == 4


def test_a_missing_server_is_named_with_its_url_and_how_to_start_it(servers):
    port = closed_port()
    result = check(
        PERSON_DATABASE_URL=servers.database,
        NOTIFIER_DATABASE_URL=servers.database,
        AMQP_URL=f"amqp://app:s3cret-password@127.0.0.1:{port}/%2F",
        SCORE_REDIS_URL=servers.redis,
    )
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert failed == [
        f"✗ AMQP_URL=amqp://app:***@127.0.0.1:{port}/%2F did not answer (AMQPConnectionError)."
    ]
    assert "rabbitmq-server -detached" in result.stdout
    assert "s3cret-password" not in result.stdout + result.stderr


def test_the_stack_script_checks_what_each_service_is_configured_with(monkeypatch):
    from stack import up as stack

    env = {**os.environ, "SCORE_REDIS_URL": "redis://127.0.0.1:1/0", "AMQP_URL": "amqp://a/%2F"}
    env.pop("PERSON_DATABASE_URL", None)
    checks = stack.server_checks(env)
    assert "SCORE_REDIS_URL=redis://127.0.0.1:1/0" in checks
    assert "AMQP_URL=amqp://a/%2F" in checks
    assert "PERSON_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/person" in checks


def test_a_cluster_answers_when_one_of_its_nodes_does(servers):
    dead = f"amqp://app:s3cret-password@127.0.0.1:{closed_port()}/%2F"
    result = check(
        PERSON_DATABASE_URL=servers.database,
        NOTIFIER_DATABASE_URL=servers.database,
        AMQP_URL=f"{dead},{servers.amqp}",
        SCORE_REDIS_URL=servers.redis,
    )
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("✓") == 4


def test_a_cluster_with_no_node_answering_names_every_node_without_passwords(servers):
    ports = closed_port(), closed_port()
    result = check(
        PERSON_DATABASE_URL=servers.database,
        NOTIFIER_DATABASE_URL=servers.database,
        AMQP_URL=",".join(f"amqp://app:s3cret-password@127.0.0.1:{p}/%2F" for p in ports),
        SCORE_REDIS_URL=servers.redis,
    )
    assert result.returncode == 1
    shown = ",".join(f"amqp://app:***@127.0.0.1:{p}/%2F" for p in ports)
    assert f"✗ AMQP_URL={shown} did not answer" in result.stdout
    assert "s3cret-password" not in result.stdout + result.stderr


def test_an_amqp_url_with_a_node_of_another_scheme_is_refused_with_the_reason(servers):
    result = check(
        PERSON_DATABASE_URL=servers.database,
        NOTIFIER_DATABASE_URL=servers.database,
        AMQP_URL=f"{servers.amqp},http://app:s3cret-password@127.0.0.1:1/",
        SCORE_REDIS_URL=servers.redis,
    )
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert len(failed) == 1 and failed[0].startswith("✗ AMQP_URL="), result.stdout
    assert "node 2 is not an amqp:// or amqps:// URL (http://)" in failed[0]
    assert "s3cret-password" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_database_url_listing_servers_answers_when_the_writable_one_does(servers):
    """PERSON_DATABASE_URL in libpq's multi-host form, a dead server first, in both spellings;
    the password is hidden in both."""
    params = conninfo_to_dict(servers.database)
    host, live = params.get("host", "127.0.0.1"), params.get("port", "5432")
    user = params.get("user", "postgres")
    password = params.get("password") or "s3cret-password"  # a trusting server ignores it
    dead = closed_port()
    result = check(
        PERSON_DATABASE_URL=(
            f"postgresql://{user}:{quote(password)}@127.0.0.1:{dead},{host}:{live}/person"
            "?target_session_attrs=read-write&connect_timeout=2"
        ),
        NOTIFIER_DATABASE_URL=(
            f"host=127.0.0.1,{host} port={dead},{live} user={user} dbname=notifier "
            f"password={password} target_session_attrs=read-write connect_timeout=2"
        ),
    )
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("✓") == 2
    assert f"{user}:***@127.0.0.1:{dead}" in result.stdout
    assert "password=*** " in result.stdout
    assert password not in result.stdout + result.stderr


def test_the_stack_script_passes_a_keyword_value_url_whole(monkeypatch):
    from stack import up as stack

    url = "host=127.0.0.1,127.0.0.2 port=5432,5433 dbname=person target_session_attrs=read-write"
    checks = stack.server_checks({**os.environ, "PERSON_DATABASE_URL": url})
    assert f"PERSON_DATABASE_URL={url}" in checks


def test_make_up_probes_servers_at_their_sockets(servers, tmp_path):
    database = socket_url(servers.database)
    with own_redis_socket() as redis_url:
        result = check(PERSON_DATABASE_URL=database, SCORE_REDIS_URL=redis_url)
        assert result.returncode == 0, result.stdout
        assert result.stdout.count("✓") == 2
    missing = f"unix://{tmp_path}/redis.sock?db=0"
    result = check(SCORE_REDIS_URL=missing)
    assert result.returncode == 1
    assert f"✗ SCORE_REDIS_URL={missing} did not answer (ConnectionError)." in result.stdout
    assert "--unixsocket" in result.stdout


@pytest.mark.cluster
def test_a_redis_cluster_answers_through_its_url_and_an_absent_one_says_how_to_start_one(
    servers, redis_cluster
):
    result = check(SCORE_REDIS_URL=redis_cluster.url)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith(f"✓ SCORE_REDIS_URL={redis_cluster.url}")
    absent = f"redis+cluster://:s3cret-password@127.0.0.1:{closed_port()}"
    result = check(SCORE_REDIS_URL=absent)
    assert result.returncode == 1
    assert "python -m stack.redis_cluster start" in result.stdout
    assert "s3cret-password" not in result.stdout + result.stderr
