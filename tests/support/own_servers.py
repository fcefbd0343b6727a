"""Servers a test starts for itself beside the run's shared ones, and removes afterwards.

A test that must reconfigure a store (make Redis refuse writes, say) never touches the servers
other tests share: it starts its own from the same binaries on a free port, in a directory of its
own, and stops it, directory included, whatever happened.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from stack.processes import free_port


class OwnRedis:
    """A redis-server of a test's own that the test can stop and start again on its port."""

    def __init__(self, *extra: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.folder = Path(tempfile.mkdtemp(prefix="own-redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.command = [
            binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
            "--appendonly", "no", "--dir", str(self.folder),
            "--logfile", str(self.folder / "redis.log"), *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)  # a process starting: there is nothing to wait on but its port
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def own_redis(*extra: str) -> Iterator[str]:
    """A redis-server of the caller's own on 127.0.0.1, keeping nothing on disk; its URL."""
    server = OwnRedis(*extra)
    try:
        server.start()
        yield server.url
    finally:
        server.remove()


@contextlib.contextmanager
def own_redis_socket() -> Iterator[str]:
    """A redis-server of the caller's own that also listens on a Unix socket in its directory;
    the socket's URL in redis-py's form (`unix:///…/redis.sock?db=0`)."""
    server = OwnRedis()
    path = server.folder / "redis.sock"
    server.command += ["--unixsocket", str(path), "--unixsocketperm", "700"]
    try:
        server.start()
        yield f"unix://{path}?db=0"
    finally:
        server.remove()
