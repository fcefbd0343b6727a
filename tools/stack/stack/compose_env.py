"""Write .env with fresh secrets for the compose stack: make compose-env.

docker-compose.yml takes every secret from the environment (or .env) with no fallback, so a stack
never runs on a password someone else knows. This writes the ones missing from .env, each a new
random value, and leaves the rest of the file alone. It also turns API keys on: without
`API_KEYS` in .env it makes an operator's key with every scope, prints it once (only its digest
is written), and gives the console a key of its own (`CONSOLE_API_KEY`, which the console needs
in clear to call the APIs).
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

from dotenv import dotenv_values
from servicekit.auth import digest, new_key

from stack import ROOT

SECRETS = (
    "POSTGRES_PASSWORD",  # the superuser: the migrate steps only
    # Each service's own database role (servicekit.roles), made by its migrate step.
    "POSTGRES_PERSON_PASSWORD",
    "POSTGRES_NOTIFIER_PASSWORD",
    "POSTGRES_CONSOLE_PASSWORD",
    "REDIS_PASSWORD",
    "RABBITMQ_ADMIN_PASSWORD",  # the administrator: the migrate step and the management UI
    # A broker user per role (messaging.permissions), made by the migrate step.
    "RABBITMQ_RELAY_PASSWORD",
    "RABBITMQ_SCORE_PASSWORD",
    "RABBITMQ_NOTIFIER_PASSWORD",
    "RABBITMQ_OPERATOR_PASSWORD",
    "RABBITMQ_PROBE_PASSWORD",
    "ACTIVATION_SECRET",
    "CONSOLE_SECRET",
    "RABBITMQ_ERLANG_COOKIE",  # the nodes of docker-compose.cluster.yml share it
)
# The operator's key: every scope the services check (README: Security).
OPERATOR_SCOPES = ("person:write", "person:read", "score:read", "notifier:read", "metrics", "admin")
# What the console reads through the APIs (its pages need admin for deliveries and rebuilds).
CONSOLE_SCOPES = ("person:read", "score:read", "notifier:read", "metrics", "admin")


def api_keys(present: dict[str, str | None]) -> tuple[list[str], str | None]:
    """The .env lines that turn keys on, and the operator's key to print; nothing when
    API_KEYS is there already (its key was printed when it was written, and is not kept)."""
    if present.get("API_KEYS"):
        return [], None
    key, entries = new_key(list(OPERATOR_SCOPES))
    lines = []
    console = present.get("CONSOLE_API_KEY")
    if console:  # a console key of the operator's own: keep it, and let it in
        entries[digest(console)] = sorted(CONSOLE_SCOPES)
    else:
        console, entry = new_key(list(CONSOLE_SCOPES))
        entries |= entry
        lines.append(f"CONSOLE_API_KEY={console}")
    # Single quotes: a literal value for python-dotenv (compose v1, the services) and compose v2.
    lines.insert(0, f"API_KEYS='{json.dumps(entries, separators=(',', ':'))}'")
    return lines, key


def main(root: Path = ROOT) -> int:
    path = root / ".env"
    present = dotenv_values(path) if path.exists() else {}
    missing = [name for name in SECRETS if not present.get(name)]
    lines = [f"{name}={secrets.token_urlsafe(32)}" for name in missing]
    key_lines, key = api_keys(present)
    lines += key_lines
    if not lines:
        print(f"{path.name} has every compose secret and API_KEYS already")
        return 0
    with path.open("a") as out:
        if path.stat().st_size and not path.read_text().endswith("\n"):
            out.write("\n")
        out.write("\n".join(lines) + "\n")
    path.chmod(0o600)
    written = [line.split("=", 1)[0] for line in lines]
    print(f"wrote {', '.join(written)} to {path.name} (mode 600; it is ignored by git)")
    if key:
        print(
            f"\nYour API key ({', '.join(OPERATOR_SCOPES)}); it is shown this once and kept\n"
            "nowhere (.env holds only its digest):\n\n"
            f"  {key}\n\n"
            'Call the APIs with -H "Authorization: Bearer <key>" and sign in to the console with '
            "it.\nLost it? Delete the API_KEYS line from .env and run make compose-env again."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
