"""Write .env with fresh secrets for the compose stack: make compose-env.

docker-compose.yml takes every secret from the environment (or .env) with no fallback, so a stack
never runs on a password someone else knows. This writes the ones missing from .env, each a new
random value, and leaves the rest of the file alone.
"""

from __future__ import annotations

import secrets
import sys

from dotenv import dotenv_values

from stack import ROOT

SECRETS = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "RABBITMQ_PASSWORD",
    "RABBITMQ_ADMIN_PASSWORD",
    "ACTIVATION_SECRET",
    "CONSOLE_SECRET",
    "RABBITMQ_ERLANG_COOKIE",  # the nodes of docker-compose.cluster.yml share it
)


def main() -> int:
    path = ROOT / ".env"
    present = dotenv_values(path) if path.exists() else {}
    missing = [name for name in SECRETS if not present.get(name)]
    if not missing:
        print(f"{path.name} has every compose secret already")
        return 0
    lines = [f"{name}={secrets.token_urlsafe(32)}" for name in missing]
    with path.open("a") as out:
        if path.stat().st_size and not path.read_text().endswith("\n"):
            out.write("\n")
        out.write("\n".join(lines) + "\n")
    path.chmod(0o600)
    print(f"wrote {', '.join(missing)} to {path.name} (mode 600; it is ignored by git)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
