"""Create the application's broker user, no administrator: python -m messaging.broker_user.

The broker's first user (RABBITMQ_DEFAULT_USER in the official image) is an administrator; the
processes connect as the user named in AMQP_URL instead, created here through the management
API with permissions on its virtual host and no tags (no management, no policies). Idempotent.
Reads AMQP_URL (the user, password and virtual host to create), RABBITMQ_MANAGEMENT_URL
(e.g. http://rabbitmq:15672) and RABBITMQ_ADMIN_USER / RABBITMQ_ADMIN_PASSWORD.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from .connection import node_urls


def _put(base: str, path: str, body: dict, auth: str) -> None:
    request = urllib.request.Request(
        f"{base.rstrip('/')}/api/{path}",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"},
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def main() -> int:
    amqp = urllib.parse.urlsplit(node_urls(os.environ["AMQP_URL"])[0])
    user = urllib.parse.unquote(amqp.username or "")
    password = urllib.parse.unquote(amqp.password or "")
    vhost = urllib.parse.unquote(amqp.path.lstrip("/")) or "/"
    if not user or not password:
        print("broker_user: AMQP_URL must name a user and a password", file=sys.stderr)
        return 2
    base = os.environ["RABBITMQ_MANAGEMENT_URL"]
    admin = f"{os.environ['RABBITMQ_ADMIN_USER']}:{os.environ['RABBITMQ_ADMIN_PASSWORD']}"
    auth = base64.b64encode(admin.encode()).decode()
    quoted_user, quoted_vhost = (
        urllib.parse.quote(user, safe=""),
        urllib.parse.quote(vhost, safe=""),
    )
    try:
        _put(base, f"users/{quoted_user}", {"password": password, "tags": ""}, auth)
        everything = {"configure": ".*", "write": ".*", "read": ".*"}
        _put(base, f"permissions/{quoted_vhost}/{quoted_user}", everything, auth)
    except (urllib.error.URLError, OSError) as exc:
        print(f"broker_user: the management API refused: {exc}", file=sys.stderr)
        return 1
    print(f"broker user {user} on {vhost}: no tags, all permissions on its virtual host")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
