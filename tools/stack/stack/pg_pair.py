"""A PostgreSQL primary and a synchronous standby on this machine, beside the system cluster: for
tests, the benchmark and trying a failover by hand.

    python -m stack.pg_pair start [--dir DIR]     initdb a primary, pg_basebackup a standby, print
                                                  the multi-host PERSON/NOTIFIER_DATABASE_URL
    python -m stack.pg_pair status [--dir DIR]    each server: up or down, primary or standby
    python -m stack.pg_pair failover [--dir DIR]  kill the primary (pg_ctl stop -m immediate) and
                                                  promote the standby, as a failover manager would
    python -m stack.pg_pair rejoin [--dir DIR]    make the killed server a standby of the new
                                                  primary (a fresh base backup), synchronous again
    python -m stack.pg_pair stop [--dir DIR]      stop both and delete DIR

The servers are `a` and `b`, each a data directory under DIR run by the PostgreSQL binaries of
PG_BIN (default /usr/lib/postgresql/15/bin) on a free port of 127.0.0.1 (TCP only: no socket in
/var/run/postgresql), trusting local connections as the development server does. Run as root,
every command runs as the `postgres` OS user (initdb refuses root); run as anyone else, as that
user. The system cluster (5432, /etc/postgresql, /var/lib/postgresql) is never read or touched.

`a` starts as the primary; `b` is its base backup (`pg_basebackup -R`: streaming from `a`), and
once it streams, `a` gets `synchronous_standby_names = '*'` (ALTER SYSTEM, so the setting is not
in `b`'s copy): a commit is acknowledged only once the standby has flushed it. After `failover`,
`b` runs alone as the primary without a synchronous standby (writes go on, with one copy) until
`rejoin` makes `a` its standby and sets the same on `b`.

`PgPair` is what the failover tests (tests/conftest.py, `pg_pair`) and bench/pg_failover_bench.py
use; `close()` stops both servers and deletes the directory whatever happened before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from stack.local_servers import LocalServers
from stack.processes import free_port

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"  # who runs the servers when this runs as root
NAMES = ("a", "b")
STATE_FILE = "pair.json"
DEFAULT_DIR = Path(tempfile.gettempdir()) / "event-replication-pg-pair"
TIMEOUT = 60.0
INITDB = ["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]
# -R: the copy streams from the primary it was taken from (primary_conninfo, standby.signal).
BASEBACKUP = ["-h", "127.0.0.1", "-U", "postgres", "-R", "-X", "stream", "-c", "fast", "--no-sync"]
# What both servers run with; the port is each one's own (postgresql.auto.conf).
SETTINGS = """
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 200
wal_level = replica
max_wal_senders = 10
wal_keep_size = '256MB'
hot_standby = on
synchronous_commit = on
log_line_prefix = '%m [%p] %q%a '
"""


class PairError(RuntimeError):
    """A server did not start, stop, promote or answer as asked."""


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    data: Path

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.name}.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def pid(self) -> int | None:
        """The postmaster's pid (its postmaster.pid file), if it runs."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid


def available() -> str | None:
    """None if a pair can be started here; otherwise why not."""
    if not (PG_BIN / "initdb").exists():
        return f"no {PG_BIN / 'initdb'} (PostgreSQL 15's server binaries; set PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"running as root, and there is no {OS_USER} user to run PostgreSQL as"
    return None


class PgPair(LocalServers):
    """Servers `a` (the first primary) and `b` under `base` (a new temporary directory by
    default); `primary` and `standby` follow failovers."""

    def __init__(self, base: Path | None = None) -> None:
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="pg-pair-"))
        self.servers = {name: Server(name, free_port(), self.base / name) for name in NAMES}
        self.primary, self.standby = "a", "b"

    # -- the pair ------------------------------------------------------------------------------
    def url(self, dbname: str) -> str:
        """The multi-host URL of a database: both servers, the one taking writes chosen at
        connect time; a server that does not answer costs at most 2 s."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.servers.values())
        return (
            f"postgresql://postgres@{hosts}/{dbname}"
            "?target_session_attrs=read-write&connect_timeout=2"
        )

    def start(self) -> PgPair:
        """initdb `a`, start it, make `b` its synchronous standby. Cleans up if it fails."""
        return super().start()

    def _start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self._own(self.base)
        first = self.servers["a"]
        self._run("initdb", "-D", first.data, *INITDB)
        with (first.data / "postgresql.conf").open("a") as conf:
            conf.write(SETTINGS)
        self._set_port(first)
        self._pg_ctl(first, "start")
        self._follow("b", "a")

    def _members(self) -> list[Server]:  # close() stops them immediately
        return list(self.servers.values())

    # -- failover ------------------------------------------------------------------------------
    def kill_primary(self) -> None:
        """Stop the primary as a crash would (`pg_ctl stop -m immediate`: no shutdown
        checkpoint, every connection cut)."""
        self._pg_ctl(self.servers[self.primary], "stop", "-m", "immediate")

    def promote(self) -> None:
        """Promote the standby (`pg_ctl promote`, waiting until it takes writes)."""
        self._pg_ctl(self.servers[self.standby], "promote")
        self.primary, self.standby = self.standby, self.primary
        self._save()

    def failover(self) -> None:
        self.kill_primary()
        self.promote()

    def rejoin(self) -> None:
        """Make the old primary (stopped) a synchronous standby of the new one, from a fresh
        base backup: what it committed alone after the split is discarded, never served."""
        old = self.servers[self.standby]
        if old.pid() is not None:
            raise PairError(f"{old.name} still runs: a former primary must be stopped to rejoin")
        shutil.rmtree(old.data, ignore_errors=True)
        self._follow(self.standby, self.primary)
        self._save()

    def heal(self) -> None:
        """Both servers running again, a primary and its synchronous standby: a primary that
        was killed is failed over from, a stopped standby rejoins."""
        if not self.running(self.primary):
            self.promote()
        if not self.running(self.standby):
            self.rejoin()

    # -- reading -------------------------------------------------------------------------------
    def running(self, name: str) -> bool:
        return self.servers[name].pid() is not None

    def sync_standbys(self) -> int:
        """Standbys the primary replicates to synchronously now."""
        with psycopg.connect(self.servers[self.primary].url(), connect_timeout=3) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
            ).fetchone()
        return int(row[0])

    # -- internals -----------------------------------------------------------------------------
    def _follow(self, name: str, primary_name: str) -> None:
        """`name` becomes a streaming standby of `primary_name`, then synchronous."""
        standby, primary = self.servers[name], self.servers[primary_name]
        self._run("pg_basebackup", "-D", standby.data, "-p", primary.port, *BASEBACKUP)
        self._set_port(standby)
        self._pg_ctl(standby, "start")
        with psycopg.connect(primary.url(), autocommit=True, connect_timeout=3) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
        self.primary, self.standby = primary_name, name
        deadline = time.monotonic() + TIMEOUT
        while self.sync_standbys() < 1:
            if time.monotonic() > deadline:
                raise PairError(f"{name} did not become a synchronous standby; see {standby.log}")
            time.sleep(0.1)

    def _set_port(self, server: Server) -> None:
        # postgresql.auto.conf is read last: a base backup's copy of the primary's port is
        # overridden here, and nothing else of the primary's ALTER SYSTEM settings stays.
        auto = server.data / "postgresql.auto.conf"
        kept = [
            line
            for line in auto.read_text().splitlines()
            if not line.startswith(("port", "synchronous_standby_names"))
        ]
        auto.write_text("\n".join([*kept, f"port = {server.port}"]) + "\n")
        self._own(auto)

    def _pg_ctl(self, server: Server, *args: str) -> None:
        self._run("pg_ctl", "-D", server.data, "-l", server.log, "-w", "-t", int(TIMEOUT), *args)

    def _stop(self, server: Server) -> None:
        if server.pid() is None:
            return
        with contextlib.suppress(PairError, subprocess.TimeoutExpired):
            self._pg_ctl(server, "stop", "-m", "immediate")
        pid = server.pid()
        if pid is not None and _is_postmaster_of(pid, server.data):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _run(self, program: str, *args: object) -> None:
        as_postgres = os.geteuid() == 0
        done = subprocess.run(
            [str(PG_BIN / program), *map(str, args)],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
            cwd=self.base,
            user=OS_USER if as_postgres else None,
            group=OS_USER if as_postgres else None,
            extra_groups=[] if as_postgres else None,
            capture_output=True,
            text=True,
            timeout=TIMEOUT + 30,
            check=False,
        )
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip())[-1500:]
            raise PairError(f"{program} {' '.join(map(str, args[:3]))}...: {said}")

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, OS_USER, OS_USER)

    def _save(self) -> None:
        state = {
            "ports": {name: server.port for name, server in self.servers.items()},
            "primary": self.primary,
        }
        (self.base / STATE_FILE).write_text(json.dumps(state))

    @classmethod
    def load(cls, base: Path) -> PgPair:
        """The pair `start` left in `base` (for the command line)."""
        state = json.loads((base / STATE_FILE).read_text())
        pair = cls.__new__(cls)
        pair.base = base
        pair.servers = {
            name: Server(name, port, base / name) for name, port in state["ports"].items()
        }
        pair.primary = state["primary"]
        pair.standby = next(name for name in NAMES if name != pair.primary)
        return pair


def _is_postmaster_of(pid: int, data: Path) -> bool:
    """The process is the postgres of that data directory, not a recycled pid."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(data).encode() in cmdline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "status", "failover", "rejoin", "stop"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"default {DEFAULT_DIR}")
    args = parser.parse_args(argv)
    if args.command == "start":
        why = available()
        if why:
            print(f"cannot start a pair here: {why}", file=sys.stderr)
            return 1
        if (args.dir / STATE_FILE).exists():
            print(f"a pair already runs from {args.dir}; stop it first", file=sys.stderr)
            return 1
        pair = PgPair(args.dir).start()
        print(f"PERSON_DATABASE_URL={pair.url('person')}")
        print(f"NOTIFIER_DATABASE_URL={pair.url('notifier')}")
        return 0
    if not (args.dir / STATE_FILE).exists():
        print(f"no pair in {args.dir}", file=sys.stderr)
        return 1
    pair = PgPair.load(args.dir)
    try:
        if args.command == "stop":
            pair.close()
            print(f"stopped both servers and deleted {args.dir}")
            return 0
        if args.command == "failover":
            old = pair.primary
            pair.failover()
            print(f"killed {old}, promoted {pair.primary}: it takes the writes now")
        elif args.command == "rejoin":
            pair.rejoin()
            print(f"{pair.standby} is a synchronous standby of {pair.primary} again")
    except PairError as exc:
        print(f"pg_pair {args.command}: {exc}", file=sys.stderr)
        return 1
    for name, server in pair.servers.items():
        role = "primary" if name == pair.primary else "standby"
        state = f"up, {role}" if pair.running(name) else "down"
        print(f"{name}: {state} (127.0.0.1:{server.port}, log {server.log})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
