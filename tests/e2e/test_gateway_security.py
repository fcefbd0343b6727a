"""Through the real gateway: Traefik's dashboard and API are not reachable, whatever the Host."""

from __future__ import annotations

import http.client
import os
from pathlib import Path

import pytest
from messaging.testing import wait_until

pytestmark = pytest.mark.e2e

DASHBOARD_PATHS = ("/dashboard/", "/api/rawdata", "/api/overview", "/api/http/routers")


def get(port: int, host: str, path: str) -> tuple[int, str]:
    """GET through the gateway with exactly this Host header."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def traefik_pid(gateway_port: int) -> int:
    """The Traefik process serving this stack's entrypoint (its command line names the port)."""
    wanted = f"--entryPoints.web.address=127.0.0.1:{gateway_port}"
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode()).name == "traefik" and wanted.encode() in argv:
            return int(entry.name)
    raise AssertionError(f"no traefik process with {wanted}")


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on: its socket inodes, looked up in its net tables."""
    inodes = set()
    for fd in (Path(f"/proc/{pid}/fd")).iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed since the listing: a connection that ended
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def test_traefik_dashboard_and_api_are_unreachable(stack):
    # The gateway routes (so a 404 below is Traefik's or the service's answer, not a dead port).
    wait_until(lambda: get(stack.port, "person.localhost", "/health")[0] == 200, what="routing")
    for host in ("person.localhost", "traefik.localhost", "127.0.0.1", f"127.0.0.1:{stack.port}"):
        for path in DASHBOARD_PATHS:
            status, body = get(stack.port, host, path)
            assert status == 404, (host, path, status, body[:200])
            assert "routers" not in body and "traefik" not in body.lower(), (host, path, body)
    # With --api.insecure the dashboard would listen on an entrypoint of its own (:8080): the
    # gateway's is the only port Traefik opens.
    assert listening_ports(traefik_pid(stack.port)) == {stack.port}
