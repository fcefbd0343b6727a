"""Run a long-lived component as a process: logging, its replica name, and SIGTERM or SIGINT
stopping it cleanly (exit status 0)."""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Any

from . import logs


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Root logging for a process: JSON lines on stderr (LOG_FORMAT=text for a terminal)."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "messaging", False):  # ours from an earlier call; others stay
            root.removeHandler(existing)
    ours = logs.handler(fmt or os.environ.get("LOG_FORMAT", "json"))
    ours.messaging = True
    root.addHandler(ours)
    root.setLevel(level or os.environ.get("LOG_LEVEL", "INFO"))
    logging.getLogger("pika").setLevel(logging.WARNING)  # chatty


def replica_id() -> str:
    """This process among the replicas of one process type: `<host>:<pid>`.

    The host tells containers and machines apart (each container has its own hostname, where
    the pid is often 1), the pid the copies a supervisor runs on one host. A restarted replica
    is a new one: what the old one reported expires.
    """
    return f"{socket.gethostname()}:{os.getpid()}"


def run_until_signalled(component: Any) -> int:
    """Run component.run() in this thread; a termination signal calls component.stop()."""

    def stop(signum: int, _frame: Any) -> None:
        logging.getLogger("servicekit").info("received %s; stopping", signal.Signals(signum).name)
        component.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    component.run()
    return 0
