"""The README's walkthrough, as written, against a running stack's Traefik, and what it must leave:
for the compose stack and for `make up` with its servers in containers."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from messaging.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]


def walkthrough_script(port: int) -> str:
    """The README's walkthrough shell blocks, as written, with the stack's gateway port."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Walkthrough", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's walkthrough has no shell block"
    return "set -e\n" + "\n".join(blocks).replace(".localhost:8000", f".localhost:{port}")


def run_walkthrough(port: int) -> None:
    """Paste the walkthrough into bash, from the project's folder, as the README says."""
    done = subprocess.run(
        ["timeout", "120", "bash", "-c", walkthrough_script(port)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"message":"created"' in done.stdout.replace(" ", "")
    assert "Account activated" in done.stdout


def check_walkthrough_outcome(get: Callable[[str, str], tuple[int, object]]) -> None:
    """The score of 4970 and the activated user with a sent welcome, as the README shows them;
    `get(host, path)` answers the status and the parsed body through the stack's Traefik."""

    def score() -> object:  # eventually consistent, as the README says
        status, body = get("score", "/12345678909/score")
        return body if status == 200 and body["debts"] == "1000.00" else None

    assert wait_until(score, what="the walkthrough's score")["score"] == 4970

    def user() -> object:
        status, body = get("notifier", "/users/12345678909")
        ok = status == 200 and body["welcome_email"]["status"] == "sent"
        return body if ok and body["status"] == "active" else None

    assert wait_until(user, what="the activated user with a sent welcome")["email"] == (
        "maria@example.com"
    )
