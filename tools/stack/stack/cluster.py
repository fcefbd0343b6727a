"""A three-node RabbitMQ cluster on this machine, beside the system node: for tests and the bench.

    python -m stack.cluster start [--dir DIR]   start c1..c3@localhost, print AMQP_URL
    python -m stack.cluster status [--dir DIR]  each node, and each queue's leader
    python -m stack.cluster stop [--dir DIR]    kill the nodes and delete DIR

Each node is a `rabbitmq-server -detached` of its own (c1@localhost, c2@localhost, c3@localhost)
with its own AMQP and distribution ports, data, logs, configuration, environment and plugins file,
all under one directory; c2 and c3 then join c1. The nodes and the command-line tools share an
Erlang cookie kept in that directory (its `home/`, used as HOME), so nothing of the system node
(rabbit@localhost on 5672, its cookie, its /etc/rabbitmq files) is read, used or changed. The
scripts are run from /usr/lib/rabbitmq/bin, not through /usr/sbin's wrappers, which would switch
to the rabbitmq user and its cookie.

`Cluster` is what the cluster tests (tests/conftest.py, `rabbit_cluster`) and bench/cluster_bench.py
use: it SIGKILLs a node's OS process and starts it again, stops and starts one cleanly, finds
which node leads a queue, and removes everything in `close()` (no node left running, the
directory deleted), whatever happened before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from stack.local_servers import LocalServers
from stack.processes import free_port

SCRIPTS = Path(os.environ.get("RABBITMQ_SCRIPTS", "/usr/lib/rabbitmq/bin"))
NAMES = ("c1", "c2", "c3")
START_TIMEOUT = 90.0
CTL_TIMEOUT = 120.0
STATE_FILE = "cluster.json"
DEFAULT_DIR = Path(tempfile.gettempdir()) / "event-replication-cluster"


class ClusterError(RuntimeError):
    """A node did not start, stop or answer as asked."""


@dataclass(frozen=True)
class Node:
    name: str  # short name: c1
    port: int  # AMQP
    dist_port: int  # Erlang distribution
    base: Path  # everything of this node lives here

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def pid_file(self) -> Path:
        return self.base / "pid"

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


class Cluster(LocalServers):
    """Three clustered nodes under `base` (a fresh temporary directory by default)."""

    def __init__(self, base: Path | None = None, names: tuple[str, ...] = NAMES) -> None:
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="rabbit-cluster-"))
        self.home = self.base / "home"
        self.nodes = {
            name: Node(name, free_port(), free_port(), self.base / name) for name in names
        }

    # -- the cluster ---------------------------------------------------------------------------
    @property
    def amqp_url(self) -> str:
        """AMQP_URL naming every node, c1 first."""
        return ",".join(node.url for node in self.nodes.values())

    def start(self) -> Cluster:
        """Start every node, then join c2.. to c1. Raises ClusterError (and cleans up) if not."""
        taken = set(NAMES) & set(epmd_names())
        if taken:
            raise ClusterError(
                f"node(s) {sorted(taken)} already run on this machine (an earlier run left them?): "
                "python -m stack.cluster stop --dir <its directory>, or kill them"
            )
        return super().start()

    def _start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        for node in self.nodes.values():
            self._write_files(node)
            self._launch(node)
        for node in self.nodes.values():
            self.await_startup(node.name)
        first, *others = self.nodes
        for name in others:
            self.ctl(name, "stop_app")
            self.ctl(name, "join_cluster", self.nodes[first].node)
            self.ctl(name, "start_app")
            self.await_startup(name)

    def _members(self) -> list[Node]:
        return list(self.nodes.values())

    def _stop(self, member: Node) -> bool:  # SIGKILL, with what else runs with this cookie
        return self._kill(member)

    def _save(self) -> None:
        (self.base / STATE_FILE).write_text(json.dumps(self._state()))

    # -- one node ------------------------------------------------------------------------------
    def kill(self, name: str) -> None:
        """SIGKILL the node's OS process, as a crash would; its data stays for a restart."""
        node = self.nodes[name]
        if not self._kill(node):
            raise ClusterError(f"{node.node} was not running")

    def restart(self, name: str) -> None:
        """Start a node that was killed (or stopped) again; it rejoins with its data."""
        node = self.nodes[name]
        self._launch(node)
        self.await_startup(name)

    def stop_app(self, name: str) -> None:
        """Stop RabbitMQ on the node cleanly (the Erlang VM stays, as `rabbitmqctl stop_app`)."""
        self.ctl(name, "stop_app")

    def start_app(self, name: str) -> None:
        self.ctl(name, "start_app")
        self.await_startup(name)

    def await_startup(self, name: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until the node runs RabbitMQ and its AMQP port accepts connections."""
        node = self.nodes[name]
        deadline = time.monotonic() + timeout
        while node.name not in epmd_names():
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.node} did not start; see {node.base / 'log'}")
            time.sleep(0.2)
        self.ctl(name, "await_startup", "--timeout", str(int(timeout)))
        while not port_open(node.port):
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.node} does not accept AMQP on {node.port}")
            time.sleep(0.1)

    def heal(self) -> None:
        """Every node running RabbitMQ again: restart the killed ones, start the stopped ones."""
        for name, node in self.nodes.items():
            if node.name not in epmd_names():
                self.restart(name)
            elif not self.running(name):
                self.start_app(name)

    def running(self, name: str) -> bool:
        """The node's AMQP port accepts connections."""
        return port_open(self.nodes[name].port)

    # -- queues --------------------------------------------------------------------------------
    def queues(self, via: str | None = None) -> dict[str, dict]:
        """name → {"leader", "members", "online"} of every queue, asked of a running node."""
        asked = via or next(n for n in self.nodes if self.running(n))
        out = self.ctl(
            asked,
            "list_queues",
            "name",
            "type",
            "leader",
            "members",
            "online",
            "messages",
            "--formatter",
            "json",
        )
        return {queue["name"]: queue for queue in json.loads(out)}

    def leader(self, queue: str) -> str:
        """The short name (c1) of the node that leads a quorum queue."""
        node = self.queues()[queue]["leader"]
        return str(node).partition("@")[0]

    # -- internals -----------------------------------------------------------------------------
    def ctl(self, name: str, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """rabbitmqctl -n <node> ARGS, with this cluster's cookie; its output."""
        done = subprocess.run(
            [str(SCRIPTS / "rabbitmqctl"), "-q", "-n", self.nodes[name].node, *args],
            env=self._env(self.nodes[name]),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise ClusterError(f"rabbitmqctl {' '.join(args)} on {name}: {done.stderr.strip()}")
        return done.stdout

    def _env(self, node: Node) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.home),  # where the Erlang cookie is, for the nodes and the CLI
            "RABBITMQ_NODENAME": node.node,
            "RABBITMQ_NODE_PORT": str(node.port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "RABBITMQ_PID_FILE": str(node.pid_file),
            "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(node.base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.base / "enabled_plugins"),
            # The distribution port on the loopback only, as the system node's.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _write_files(self, node: Node) -> None:
        node.base.mkdir(parents=True, exist_ok=True)
        # The system /etc/rabbitmq/rabbitmq.conf pins 5672: each node names its own port.
        (node.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{node.port}\n"
            # The bench and the fault runs write hundreds of MB; the default 50 MB disk alarm is
            # fine, but a memory alarm at 40 % of RAM must not depend on what else runs here.
            "vm_memory_high_watermark.absolute = 1GB\n"
        )
        (node.base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's NODENAME
        (node.base / "enabled_plugins").write_text("[].\n")

    def _launch(self, node: Node) -> None:
        node.pid_file.unlink(missing_ok=True)
        done = subprocess.run(
            [str(SCRIPTS / "rabbitmq-server"), "-detached"],
            env=self._env(node),
            cwd=node.base,
            capture_output=True,
            text=True,
            timeout=60,
            start_new_session=True,
            check=False,
        )
        if done.returncode != 0:
            raise ClusterError(f"rabbitmq-server for {node.node}: {done.stderr.strip()}")

    def _kill(self, node: Node) -> bool:
        """SIGKILL the node's VM; True if it was running. Waits until it is gone."""
        pid = node.pid()
        if pid is None or not _is_ours(pid, self.home):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (process_alive(pid) or node.name in epmd_names()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return True

    def _state(self) -> dict:
        return {
            "base": str(self.base),
            "nodes": {
                n.name: {"port": n.port, "dist_port": n.dist_port} for n in self.nodes.values()
            },
        }

    @classmethod
    def load(cls, base: Path) -> Cluster:
        """The cluster `start` left in `base` (for the command line's status and stop)."""
        state = json.loads((base / STATE_FILE).read_text())
        cluster = cls.__new__(cls)
        cluster.base, cluster.home = base, base / "home"
        cluster.nodes = {
            name: Node(name, v["port"], v["dist_port"], base / name)
            for name, v in state["nodes"].items()
        }
        return cluster


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by init) is gone for every purpose here.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return False
    return True


def _is_ours(pid: int, home: Path) -> bool:
    """The process is a VM of this cluster (started with its HOME), not a recycled pid."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"-home" in cmdline and str(home).encode() in cmdline


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def epmd_names(port: int = 4369) -> list[str]:
    """The node names registered with the local epmd (its NAMES request, answered in text)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(struct.pack(">HB", 1, 110))  # length 1, NAMES_REQ
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return []
    return [line.split()[1] for line in data[4:].decode().splitlines() if line.startswith("name")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "status", "stop"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"default {DEFAULT_DIR}")
    args = parser.parse_args(argv)
    if args.command == "start":
        if (args.dir / STATE_FILE).exists():
            print(f"a cluster already runs from {args.dir}; stop it first", file=sys.stderr)
            return 1
        args.dir.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(args.dir).start()
        print(f"AMQP_URL={cluster.amqp_url}")
        print("QUEUE_GROUP_SIZE=3")
        return 0
    if not (args.dir / STATE_FILE).exists():
        print(f"no cluster in {args.dir}", file=sys.stderr)
        return 1
    cluster = Cluster.load(args.dir)
    if args.command == "stop":
        cluster.close()
        print(f"stopped the cluster and deleted {args.dir}")
        return 0
    for name, node in cluster.nodes.items():
        print(f"{node.node}: {'up' if cluster.running(name) else 'down'} (AMQP {node.port})")
    if any(cluster.running(name) for name in cluster.nodes):
        for queue, info in sorted(cluster.queues().items()):
            print(f"{queue}: leader {info.get('leader')}, online {info.get('online')}")
    print(f"AMQP_URL={cluster.amqp_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
