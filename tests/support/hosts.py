"""A host name of a test's own in /etc/hosts, which the test can make stop resolving.

A node of a cluster whose container stopped loses its name (compose's DNS forgets it): clients
that connect again meet a name that does not resolve. A test adds its own name with a marker
line, removes it to play that fault, and always removes it at the end; it never touches another
line. Edits hold a lock, so concurrent test runs on one machine do not clobber each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

HOSTS = Path("/etc/hosts")
LOCK = Path("/tmp/event-replication-hosts.lock")


def can_edit() -> bool:
    return os.access(HOSTS, os.W_OK)


class HostsName:
    def __init__(self, address: str = "127.0.0.1") -> None:
        self.name = f"node-{uuid.uuid4().hex[:8]}.event-replication.test"
        self.line = f"{address} {self.name}  # event-replication test {os.getpid()}"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[str]]:
        with LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines = HOSTS.read_text().splitlines()
            kept = [line for line in lines if self.name not in line]
            yield kept
            text = "\n".join(kept) + "\n"
            staged = HOSTS.with_name(f".hosts.{os.getpid()}")
            try:  # a reader never sees a half-written file
                staged.write_text(text)
                os.chmod(staged, HOSTS.stat().st_mode)
                os.replace(staged, HOSTS)
            except OSError:  # a bind-mounted file (a container's) cannot be replaced
                staged.unlink(missing_ok=True)
                HOSTS.write_text(text)

    def resolve(self) -> None:
        with self._locked() as lines:
            lines.append(self.line)

    def forget(self) -> None:
        with self._locked():
            pass
