"""E-mail: compose from templates with an activation link, and deliver through SendGrid.

Without SENDGRID_API_KEY the sender writes into the development mailbox instead (store.py).
"""

from __future__ import annotations

import json
import logging
import random
import time
import unicodedata
import urllib.error
from dataclasses import dataclass
from typing import Any

from itsdangerous import URLSafeTimedSerializer
from jinja2 import Environment, PackageLoader, select_autoescape
from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient

log = logging.getLogger("notifier.email")

# The activation token format is the contract with the person service, which verifies it:
# same secret, same salt, payload {"cpf", "email", "registered_at"} (the registration's
# created_at, so a link of a deleted registration cannot activate a later one with the same CPF
# and address; tests/test_activation_contract.py).
TOKEN_SALT = "person-activation"
SUBJECTS = {"welcome": "Welcome! Activate your account", "activation": "Your activation link"}


@dataclass(frozen=True)
class Composed:
    subject: str
    html: str
    text: str
    link: str


class Composer:
    """Renders the welcome and activation e-mails, each with a fresh signed link."""

    def __init__(self, secret: str, person_url: str, ttl_seconds: int) -> None:
        self._tokens = URLSafeTimedSerializer(secret, salt=TOKEN_SALT)
        self.person_url, self.ttl_seconds = person_url, ttl_seconds
        env = Environment(  # templates ship with the package: loaded once, never re-checked
            loader=PackageLoader("notifier"),
            autoescape=select_autoescape(["html"]),
            auto_reload=False,
        )
        self._templates = {
            (kind, ext): env.get_template(f"{kind}.{ext}")
            for kind in SUBJECTS
            for ext in ("html", "txt")
        }

    def link(self, cpf: str, email: str, registered_at: str) -> str:
        token = self._tokens.dumps({"cpf": cpf, "email": email, "registered_at": registered_at})
        return f"{self.person_url}/person/{cpf}/activate?token={token}"

    def compose(self, kind: str, cpf: str, name: str, email: str, registered_at: str) -> Composed:
        link = self.link(cpf, email, registered_at)
        values = {"name": greeting_name(name), "link": link, "ttl_hours": self.ttl_seconds // 3600}
        return Composed(
            SUBJECTS[kind],
            self._templates[kind, "html"].render(values),
            self._templates[kind, "txt"].render(values),
            link,
        )


# What a name may hold to be put in an e-mail: letters (any script) and their marks, single
# spaces, and the punctuation of names. No digit, no '@', ':' or '/', and a full stop only at
# the end of a word: nothing a mail client could turn into a link or an address.
_NAME_PUNCTUATION = frozenset("'\u2019-.,")
NAME_MOST = 100


def greeting_name(text: str) -> str | None:
    """The name an e-mail greets the person by, or None to greet them without it.

    Every person field comes from an API client, so a name is used only if it is plainly a
    name: any run of whitespace becomes one space, and any other character must be a letter, a
    mark or name punctuation, with a full stop only before a space or at the end (so that
    "evil.example", "1.2.3.4", "a@b" or "https://..." cannot appear, whatever the script or the
    look-alike characters). Anything else is left out whole, not trimmed into a new sentence.
    """
    name = " ".join(text.split())
    if not name or len(name) > NAME_MOST:
        return None
    for at, ch in enumerate(name):
        if ch == " " or unicodedata.category(ch)[0] in "LM":
            continue
        if ch not in _NAME_PUNCTUATION or (ch == "." and name[at + 1 : at + 2] not in ("", " ")):
            return None
    return name


@dataclass(frozen=True)
class Outcome:
    """What one delivery attempt came to."""

    status: str  # "sent", "retry" or "failed"
    detail: str = ""
    message_id: str | None = None
    retry_after: float | None = None  # seconds, when the provider said how long to wait


class SendGridTransport:
    """Sends through the official client; classifies every answer into an Outcome."""

    name = "sendgrid"

    def __init__(self, api_key: str, host: str, from_email: str, timeout: float) -> None:
        self.client = SendGridAPIClient(api_key, host=host)
        self.from_email, self.timeout = from_email, timeout

    def send(self, delivery: dict[str, Any]) -> Outcome:
        body = {
            "personalizations": [{"to": [{"email": delivery["to_email"]}]}],
            "from": {"email": self.from_email},
            "subject": delivery["subject"],
            "content": [
                {"type": "text/plain", "value": delivery["text"]},
                {"type": "text/html", "value": delivery["html"]},
            ],
            "custom_args": {"delivery_id": str(delivery["id"])},
        }
        try:
            response = self.client.client.mail.send.post(request_body=body, timeout=self.timeout)
        except HTTPError as exc:
            return classify_http_error(exc)
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as exc:
            return Outcome("retry", f"{type(exc).__name__}: {exc}")
        headers = {k.lower(): v for k, v in (response.headers or {}).items()}
        return Outcome("sent", f"HTTP {response.status_code}", headers.get("x-message-id"))


def classify_http_error(exc: HTTPError) -> Outcome:
    status = exc.status_code
    body = _text(exc.body)
    if status == 429:
        return Outcome("retry", f"HTTP 429: {body}", retry_after=_rate_limit_wait(exc.headers))
    if status >= 500:
        return Outcome("retry", f"HTTP {status}: {body}")
    return Outcome("failed", f"HTTP {status}: {body}")


def _rate_limit_wait(headers: Any) -> float:
    """Seconds until SendGrid's X-RateLimit-Reset (epoch seconds), or Retry-After."""
    get = headers.get if headers is not None else (lambda _k: None)
    reset = get("X-RateLimit-Reset")
    if reset and str(reset).strip().isdigit():
        return max(0.0, int(reset) - time.time())
    after = get("Retry-After")
    if after and str(after).strip().isdigit():
        return float(after)
    return 1.0


def backoff_seconds(attempts: int, cap: float = 300.0) -> float:
    """Exponential backoff with jitter for the n-th failed attempt."""
    ceiling = min(cap, 2.0**attempts)
    return random.uniform(ceiling / 2, ceiling)


def _text(body: Any) -> str:
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    try:
        return json.dumps(json.loads(body))[:2000]
    except (TypeError, ValueError):
        return str(body)[:2000]
