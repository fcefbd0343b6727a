"""gunicorn settings shared by the three APIs: each service's gunicorn.conf.py takes them."""

from __future__ import annotations

import os
from typing import Any


def gunicorn_settings(prefix: str, default_port: int) -> dict[str, Any]:
    """Bind on BIND or 127.0.0.1:<PREFIX>_PORT; <PREFIX>_WORKERS processes of <PREFIX>_THREADS.

    Logs are JSON lines like every other process's (LOG_FORMAT=text for plain ones); the access
    line carries the request id the response was given.
    """
    fmt = os.environ.get("LOG_FORMAT", "json")
    formatter = (
        {"()": "servicekit.logs.JsonFormatter"}
        if fmt == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    )
    return {
        "bind": os.environ.get(
            "BIND", f"127.0.0.1:{os.environ.get(f'{prefix}_PORT', default_port)}"
        ),
        "workers": int(os.environ.get(f"{prefix}_WORKERS", "2")),
        "threads": int(os.environ.get(f"{prefix}_THREADS", "4")),
        "worker_class": "gthread",
        "graceful_timeout": 20,
        # Traefik keeps idle connections to a service open for 90 s and reuses them: gunicorn
        # must not close one first (its default is 2 s), or a POST sent on it as it closes gets
        # a 502, which Traefik does not retry.
        "keepalive": 120,
        # gunicorn's runtime control socket (gunicornc) is not used: every master on a machine
        # would share one path in $HOME, which a container's non-root user cannot even create.
        "control_socket_disable": True,
        "accesslog": "-",
        # The path without its query string: activation links carry their token there.
        "access_log_format": (
            '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)ss request_id=%({x-request-id}o)s'
        ),
        "logconfig_dict": {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"line": formatter},
            "handlers": {
                "stderr": {"class": "logging.StreamHandler", "formatter": "line"},
                "stdout": {
                    "class": "logging.StreamHandler",
                    "formatter": "line",
                    "stream": "ext://sys.stdout",
                },
            },
            "root": {"level": os.environ.get("LOG_LEVEL", "INFO"), "handlers": ["stderr"]},
            "loggers": {
                "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
                "gunicorn.access": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
                "pika": {"level": "WARNING"},
            },
        },
    }
