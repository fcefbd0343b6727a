"""The run's servers (tests/support/backing_servers.py) answer; with containers, they run from the
`*_IMAGE` images, each port published on 127.0.0.1 only, and carry the run's label (so a later run
can remove what a killed one left)."""

from __future__ import annotations

import os

import pika
import psycopg
import pytest
import redis
from backing_servers import RUN_LABEL, images, use_containers

pytestmark = [pytest.mark.integration, pytest.mark.containers]


def test_the_runs_servers_answer_and_containers_run_the_named_images_on_127_0_0_1(
    servers, make_database
):
    assert servers.where == ("containers" if use_containers() else "local")
    with psycopg.connect(make_database("smoke")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    pika.BlockingConnection(pika.URLParameters(servers.amqp)).close()
    assert redis.Redis.from_url(servers.redis).ping()
    if servers.where != "containers":
        return

    import docker

    client = docker.from_env()
    try:
        found = client.containers.list(filters={"label": f"{RUN_LABEL}={os.getpid()}"})
        assert sorted(c.attrs["Config"]["Image"] for c in found) == sorted(images().values())
        for container in found:
            bindings = container.attrs["HostConfig"]["PortBindings"].values()
            assert {b["HostIp"] for binding in bindings for b in binding} == {"127.0.0.1"}
    finally:
        client.close()
