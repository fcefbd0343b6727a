"""Run a relay or consumer as a process: SIGTERM and SIGINT stop it cleanly, exit status 0."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any


def configure_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=level or os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # pika is chatty; python_http_client (SendGrid's) logs request headers, API key included,
    # at DEBUG: never let it below WARNING.
    logging.getLogger("pika").setLevel(logging.WARNING)
    logging.getLogger("python_http_client").setLevel(logging.WARNING)


def run_until_signalled(component: Any) -> int:
    """Run component.run() in this thread; a termination signal calls component.stop()."""

    def stop(signum: int, _frame: Any) -> None:
        logging.getLogger("messaging").info("received %s; stopping", signal.Signals(signum).name)
        component.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    component.run()
    return 0
