"""A Redis Cluster on this machine, beside the system Redis: for tests, the bench and `make up`.

    python -m stack.redis_cluster start [--dir DIR]   start it, print SCORE_REDIS_URL
    python -m stack.redis_cluster status [--dir DIR]  each node's role and state
    python -m stack.redis_cluster stop [--dir DIR]    kill the nodes and delete DIR

Three masters and a replica each: six `redis-server --cluster-enabled yes` (Debian's binary) on
free ports of 127.0.0.1, each with its own cluster bus port, configuration, nodes file and log
in a directory of its own under one directory, joined by `redis-cli --cluster create
--cluster-replicas 1`. They keep nothing on disk but their nodes file (no snapshot, no append
only file): a node restarted comes back empty and, a replica by then, copies its master. The
system Redis (6379) is never read or changed.

`LocalRedisCluster` is what the Redis Cluster tests (tests/support/redis_cluster.py) and
bench/redis_cluster_bench.py use: it fails a master over (`CLUSTER FAILOVER` on its replica),
SIGKILLs a node and starts it again, finds which master serves a key, and removes everything in
`close()` (no node left running, the directory deleted), whatever happened before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from stack.cluster import process_alive
from stack.local_servers import LocalServers
from stack.processes import free_port

MASTERS = 3
NODE_TIMEOUT_MS = 2000  # how long a master may be silent before its replica takes over
START_TIMEOUT = 60.0
STATE_FILE = "redis-cluster.json"
DEFAULT_DIR = Path(tempfile.gettempdir()) / "event-replication-redis-cluster"


class RedisClusterError(RuntimeError):
    """A node did not start, stop, fail over or answer as asked."""


@dataclass(frozen=True)
class Node:
    port: int
    bus_port: int  # the cluster bus (gossip, failover votes)
    base: Path  # everything of this node lives here

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.base / "redis.pid"

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=1)


class LocalRedisCluster(LocalServers):
    """`masters` masters with a replica each, under `base` (a fresh temporary directory by
    default)."""

    def __init__(self, base: Path | None = None, masters: int = MASTERS) -> None:
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.processes: dict[int, subprocess.Popen] = {}
        ports: list[int] = []
        while len(ports) < masters * 4:  # a client port and a bus port per node, all distinct
            if (port := free_port()) not in ports:
                ports.append(port)
        self.nodes = {
            port: Node(port, bus, self.base / f"node-{n + 1}")
            for n, (port, bus) in enumerate(zip(ports[::2], ports[1::2], strict=True))
        }

    # -- the cluster ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """SCORE_REDIS_URL naming every node."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes.values())

    def start(self) -> LocalRedisCluster:
        """Start every node, create the cluster, wait until it serves every slot with every
        replica in sync. Raises RedisClusterError (and cleans up) if not."""
        if not Path(self.binary).exists() or not shutil.which("redis-cli"):
            raise RedisClusterError(
                "redis-server and redis-cli are not installed (Debian package redis-server)"
            )
        return super().start()

    def _start(self) -> None:
        for node in self.nodes.values():
            node.base.mkdir(parents=True, exist_ok=True)
            (node.base / "redis.conf").write_text(_configuration(node))
            self._launch(node)
        addresses = [node.address for node in self.nodes.values()]
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        if created.returncode != 0:
            raise RedisClusterError(f"redis-cli --cluster create: {created.stdout[-500:]}")
        self.await_healthy()

    def _members(self) -> list[Node]:
        return list(self.nodes.values())

    def _stop(self, member: Node) -> bool:  # SIGKILL
        return self._kill(member)

    def _save(self) -> None:
        (self.base / STATE_FILE).write_text(json.dumps(self._state()))

    def await_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every node runs, says `cluster_state:ok`, knows every other, and every
        master has a replica whose link to it is up."""
        self._until(self._healthy, timeout, "the cluster to be whole and in sync")

    def heal(self) -> None:
        """Every node running again (the killed ones restarted, as replicas), all in sync."""
        for node in self.nodes.values():
            if not self.running(node.port):
                self.restart(node.port)
        self.await_healthy()

    # -- roles ---------------------------------------------------------------------------------
    def topology(self) -> dict[int, dict[str, Any]]:
        """port → {"id", "role" (master/replica), "master" (its master's port), "connected",
        "slots"} of every node, as a running node sees them."""
        for node in self.nodes.values():
            with contextlib.suppress(redis.RedisError):
                return _parse_nodes(node.client().execute_command("CLUSTER", "NODES"))
        raise RedisClusterError("no node of the cluster answers")

    def masters(self) -> list[int]:
        """Ports of the masters that serve slots."""
        return sorted(p for p, n in self.topology().items() if n["role"] == "master" and n["slots"])

    def replica_of(self, master: int) -> int:
        found = [p for p, n in self.topology().items() if n["master"] == master]
        if not found:
            raise RedisClusterError(f"the master on {master} has no replica")
        return found[0]

    def master_of(self, key: str) -> int:
        """The port of the master that serves `key`'s slot."""
        slot = key_slot(key.encode())
        for port, node in self.topology().items():
            if node["role"] == "master" and any(a <= slot <= b for a, b in node["slots"]):
                return port
        raise RedisClusterError(f"no master serves slot {slot}")

    # -- faults --------------------------------------------------------------------------------
    def failover(self, master: int, timeout: float = 30.0) -> int:
        """`CLUSTER FAILOVER` on the master's replica (the master stops taking writes, its
        replica catches up and takes over); the new master's port, once the cluster agrees."""
        replica = self.replica_of(master)
        self.nodes[replica].client().execute_command("CLUSTER FAILOVER")

        def switched() -> bool:
            seen = self.topology()
            return seen[replica]["role"] == "master" and seen[master]["role"] == "replica"

        self._until(switched, timeout, f"{replica} to take over from {master}")
        self._until(self._state_ok, timeout, "cluster_state:ok after the failover")
        return replica

    def crash(self, master: int, timeout: float = 60.0) -> int:
        """SIGKILL a master; its replica's port once it took over (after NODE_TIMEOUT_MS of
        silence the others mark the master failed and elect its replica) and the cluster serves
        every slot again. Writes the master took but had not sent its replica yet are lost."""
        replica = self.replica_of(master)
        self.kill(master)

        def promoted() -> bool:
            try:
                return self.topology()[replica]["role"] == "master"
            except (RedisClusterError, KeyError):
                return False

        self._until(promoted, timeout, f"{replica} to take over from {master}")
        self._until(self._state_ok, timeout, "cluster_state:ok after the takeover")
        return replica

    def kill(self, port: int) -> None:
        """SIGKILL a node, as a crash would."""
        if not self._kill(self.nodes[port]):
            raise RedisClusterError(f"the node on {port} was not running")

    def restart(self, port: int) -> None:
        """Start a node that was killed again; it rejoins the cluster from its nodes file."""
        self._launch(self.nodes[port])

    def running(self, port: int) -> bool:
        try:
            return bool(self.nodes[port].client().ping())
        except redis.RedisError:
            return False

    # -- internals -----------------------------------------------------------------------------
    def _launch(self, node: Node) -> None:
        node.pid_file.unlink(missing_ok=True)
        # A child of this process, in a session of its own (a Ctrl-C of the caller's terminal is
        # not for it), reaped by _kill when it is this process that kills it.
        process = subprocess.Popen(
            [self.binary, str(node.base / "redis.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes[node.port] = process

        def up() -> bool:
            if process.poll() is not None:
                raise RedisClusterError(f"redis-server on {node.port} exited; see its redis.log")
            return self.running(node.port)

        self._until(up, START_TIMEOUT, f"the node on {node.port}")

    def _kill(self, node: Node) -> bool:
        """SIGKILL the node's process; True if it was running. Waits until it is gone."""
        process = self.processes.pop(node.port, None)
        if process is not None:
            running = process.poll() is None
            process.kill()
            process.wait(30)
            node.pid_file.unlink(missing_ok=True)
            return running
        pid = node.pid()  # started by another process (python -m stack.redis_cluster start)
        if pid is None or not _is_ours(pid, node.base):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self._until(lambda: not process_alive(pid), 30, f"the node on {node.port} to exit")
        node.pid_file.unlink(missing_ok=True)
        return True

    def _state_ok(self) -> bool:
        for node in self.nodes.values():
            if not self.running(node.port):
                continue
            info = node.client().execute_command("CLUSTER", "INFO").decode()
            if "cluster_state:ok" not in info:
                return False
        return True

    def _healthy(self) -> bool:
        try:
            if not all(self.running(port) for port in self.nodes) or not self._state_ok():
                return False
            for node in self.nodes.values():
                seen = _parse_nodes(node.client().execute_command("CLUSTER", "NODES"))
                if len(seen) != len(self.nodes) or not all(n["connected"] for n in seen.values()):
                    return False
            seen = self.topology()
            masters = [p for p, n in seen.items() if n["role"] == "master" and n["slots"]]
            for master in masters:
                replicas = [p for p, n in seen.items() if n["master"] == master]
                if not replicas:
                    return False
                for replica in replicas:
                    info = self.nodes[replica].client().info("replication")
                    if info.get("master_link_status") != "up":
                        return False
            return len(masters) * 2 == len(self.nodes)
        except redis.RedisError:
            return False

    @staticmethod
    def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise RedisClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.05)  # polling a server's own state: there is nothing to wait on

    def _state(self) -> dict:
        return {
            "base": str(self.base),
            "nodes": [{"port": n.port, "bus_port": n.bus_port, "base": str(n.base)}
                      for n in self.nodes.values()],
        }  # fmt: skip

    @classmethod
    def load(cls, base: Path) -> LocalRedisCluster:
        """The cluster `start` left in `base` (for the command line's status and stop)."""
        state = json.loads((base / STATE_FILE).read_text())
        cluster = cls.__new__(cls)
        cluster.base = base
        cluster.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        cluster.processes = {}
        cluster.nodes = {
            n["port"]: Node(n["port"], n["bus_port"], Path(n["base"])) for n in state["nodes"]
        }
        return cluster


def _configuration(node: Node) -> str:
    return "\n".join(
        [
            "bind 127.0.0.1",
            f"port {node.port}",
            f"cluster-port {node.bus_port}",
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {NODE_TIMEOUT_MS}",
            f"dir {node.base}",
            "daemonize no",
            f"pidfile {node.pid_file}",
            f"logfile {node.base / 'redis.log'}",
            'save ""',
            "appendonly no",
            "",
        ]
    )


def _parse_nodes(raw: bytes | str) -> dict[int, dict[str, Any]]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    rows = [line.split() for line in text.splitlines() if line.strip()]
    ports = {row[0]: int(row[1].split("@")[0].rsplit(":", 1)[1]) for row in rows}
    found = {}
    for row in rows:
        flags = row[2].split(",")
        slots = []
        for part in row[8:]:
            if part.startswith("["):  # a slot being migrated
                continue
            first, _, last = part.partition("-")
            slots.append((int(first), int(last or first)))
        found[ports[row[0]]] = {
            "id": row[0],
            "role": "master" if "master" in flags else "replica",
            "master": ports.get(row[3]),
            "connected": row[7] == "connected" and "fail" not in flags and "fail?" not in flags,
            "slots": slots,
        }
    return found


def _is_ours(pid: int, base: Path) -> bool:
    """The process is this node's redis-server (it runs in the node's directory), not a
    recycled pid."""
    try:
        return Path(f"/proc/{pid}/cwd").resolve() == base.resolve()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "status", "stop"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"default {DEFAULT_DIR}")
    args = parser.parse_args(argv)
    if args.command == "start":
        if (args.dir / STATE_FILE).exists():
            print(f"a Redis Cluster already runs from {args.dir}; stop it first", file=sys.stderr)
            return 1
        args.dir.mkdir(parents=True, exist_ok=True)
        cluster = LocalRedisCluster(args.dir).start()
        print(f"SCORE_REDIS_URL={cluster.url}")
        return 0
    if not (args.dir / STATE_FILE).exists():
        print(f"no Redis Cluster in {args.dir}", file=sys.stderr)
        return 1
    cluster = LocalRedisCluster.load(args.dir)
    if args.command == "stop":
        cluster.close()
        print(f"stopped the Redis Cluster and deleted {args.dir}")
        return 0
    try:
        seen = cluster.topology()
    except RedisClusterError:
        seen = {}
    for port in cluster.nodes:
        node = seen.get(port, {})
        role = node.get("role", "?")
        state = "up" if cluster.running(port) else "down"
        print(f"127.0.0.1:{port}: {state}, {role}, slots {node.get('slots', [])}")
    print(f"SCORE_REDIS_URL={cluster.url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
