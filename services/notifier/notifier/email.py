"""E-mail: compose from templates with an activation link, and deliver through SendGrid's v3 API.

Without SENDGRID_API_KEY the sender writes into the development mailbox instead (store.py).
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import random
import ssl
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import urllib3
from itsdangerous import URLSafeTimedSerializer
from jinja2 import Environment, PackageLoader, select_autoescape

log = logging.getLogger("notifier.email")

# The activation token format is the contract with the person service, which verifies it:
# same secret, same salt, payload {"cpf", "email", "registered_at"} (the registration's
# created_at, so a link of a deleted registration cannot activate a later one with the same CPF
# and address; tests/test_activation_contract.py).
TOKEN_SALT = "person-activation"
# The person service's event types that carry a person's state (its catalogue is published at
# person.localhost/asyncapi.json): the ones an e-mail may be sent on.
PERSON_CREATED, PERSON_UPDATED = "person.created", "person.updated"
ACTIVATION_REQUESTED = "person.activation_requested"


@dataclass(frozen=True)
class Composed:
    subject: str
    html: str
    text: str
    link: str | None


class Composer:
    """Renders each kind of e-mail (KINDS), with the link its kind carries."""

    def __init__(self, secret: str, person_url: str, ttl_seconds: int) -> None:
        self._tokens = URLSafeTimedSerializer(secret, salt=TOKEN_SALT)
        self.person_url, self.ttl_seconds = person_url, ttl_seconds
        env = Environment(  # templates ship with the package: loaded once, never re-checked
            loader=PackageLoader("notifier"),
            autoescape=select_autoescape(["html"]),
            auto_reload=False,
        )
        self._templates = {
            kind: (env.get_template(spec.html), env.get_template(spec.text))
            for kind, spec in KINDS.items()
        }

    def link(self, cpf: str, email: str, registered_at: str) -> str:
        """The activation link: signed for this registration and this address."""
        token = self._tokens.dumps({"cpf": cpf, "email": email, "registered_at": registered_at})
        return f"{self.person_url}/person/{cpf}/activate?token={token}"

    def compose(self, kind: str, cpf: str, name: str, email: str, registered_at: str) -> Composed:
        spec = KINDS[kind]
        link = spec.link(self, cpf, email, registered_at) if spec.link else None
        values = {"name": greeting_name(name), "link": link, "ttl_hours": self.ttl_seconds // 3600}
        html, text = self._templates[kind]
        return Composed(spec.subject, html.render(values), text.render(values), link)

    def for_delivery(self, delivery: dict[str, Any]) -> Composed:
        """The e-mail of a delivery, composed as it goes out from the intent it records (kind,
        cpf, name, to_email, registered_at): its link is signed now, so one sent again later
        carries a fresh one. A delivery recorded with its text (before migration 015) is sent as
        recorded. Raises ValueError for an intent no kind of KINDS can compose."""
        if delivery.get("html") is not None:
            return Composed(delivery["subject"], delivery["html"], delivery["text"] or "", None)
        if delivery.get("kind") not in KINDS:
            raise ValueError(f"no kind of e-mail is called {delivery.get('kind')!r}")
        return self.compose(
            delivery["kind"],
            delivery["cpf"],
            delivery.get("name") or "",
            delivery["to_email"],
            registration_time(delivery.get("registered_at")),
        )


def registration_time(value: Any) -> str:
    """A registration's time (ISO 8601 text, as events carry it and the sender's statements
    return it; or a datetime) as a link's payload holds it: in UTC, to the microsecond.
    ValueError if it is missing or not a time with its zone (no link could be verified)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:  # 'infinity', a word, a malformed time
            raise ValueError(f"the registration's time is not ISO 8601: {value!r}") from None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"the registration's time is not a time with its zone: {value!r}")
    try:
        return value.astimezone(UTC).isoformat()
    except OverflowError:  # year 1 east of UTC, 9999 west of it: no year in UTC
        raise ValueError(f"the registration's time has no year in UTC: {value!r}") from None


def composer_for(config: Any) -> Composer:
    """The composer of a NotifierConfig: its activation secret, person URL and link TTL."""
    return Composer(config.activation_secret, config.person_url, config.activation_ttl_seconds)


@dataclass(frozen=True)
class Kind:
    """A kind of e-mail, as data: when it is called for, what it says, the link it carries.

    The consumer records one of a kind for each applied event of a type in `on` whose person
    has an address (and for whom `when` holds, if given); the SQL then decides as for every
    kind (store._APPLY_PERSON): once per event (or per registration, if `once`), none for a
    late or replayed event, a registration's welcome before anything else, the mailbox's daily
    cap, cancelled if the person leaves the address. Its templates (templates/) get `name`
    (None unless it is plainly a name), `link` and `ttl_hours`.
    """

    subject: str
    on: tuple[str, ...]
    html: str
    text: str
    link: Callable[[Composer, str, str, str], str] | None = None  # (cpf, email, registered_at)
    when: Callable[[Any], bool] | None = None  # of the person's new state (consumer.PersonFields)
    once: bool = False  # at most one per registration of the person


# Every kind of e-mail the notifier sends. A new kind is a row here and its two templates.
KINDS: dict[str, Kind] = {
    # On the first event that gives the registration an address; it carries the activation link.
    "welcome": Kind(
        "Welcome! Activate your account",
        on=(PERSON_CREATED, PERSON_UPDATED, ACTIVATION_REQUESTED),
        html="welcome.html",
        text="welcome.txt",
        link=Composer.link,
        once=True,
    ),
    # A new link, each time the person asks for one (or changes address), to the current one.
    "activation": Kind(
        "Your activation link",
        on=(ACTIVATION_REQUESTED,),
        html="activation.html",
        text="activation.txt",
        link=Composer.link,
    ),
}


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
    """Posts to SendGrid's v3 API over kept-alive connections; classifies every answer.

    One pool per process (the sender builds one transport) holds at most `connections` of them,
    one per sender worker, each verified against `context` once and then kept: an e-mail costs
    a request, not a TCP and TLS handshake. urllib3 replaces a connection SendGrid closed while
    it was idle before using it. It never repeats a request by itself: a request that was
    written and got no answer may have been accepted, and only the sender decides whether to
    send it again (an attempt, with backoff), as the claim and lease require.
    """

    name = "sendgrid"

    def __init__(
        self,
        api_key: str,
        host: str,
        from_email: str,
        timeout: float,
        context: ssl.SSLContext | None = None,
        connections: int = 1,
    ) -> None:
        self.from_email = from_email
        self._url = urllib3.util.parse_url(host.rstrip("/") + "/v3/mail/send")
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "notifier",
        }
        # One pool for the one host: at most `connections` open (block=True), none retried.
        self._manager = urllib3.PoolManager(
            num_pools=1,
            maxsize=connections,
            block=True,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=False,
            ssl_context=context,
        )
        self._pool = self._manager.connection_from_url(self._url.url)
        self._pool_timeout = timeout

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
            response = self._pool.urlopen(
                "POST",
                self._url.request_uri,
                body=json.dumps(body).encode(),
                headers=self._headers,
                retries=False,
                redirect=False,
                pool_timeout=self._pool_timeout,
            )
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            # Refused, timed out, a certificate not trusted, an answer cut short or not HTTP.
            return Outcome("retry", f"{type(exc).__name__}: {exc}")
        if 200 <= response.status < 300:
            return Outcome("sent", f"HTTP {response.status}", response.headers.get("X-Message-Id"))
        return classify_refusal(response.status, response.data, response.headers)


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """The TLS context for SendGrid: verification on, the system's CAs or only `ca_file`'s.

    Made once per process and CA file (creating one loads every CA certificate: ~25 ms of CPU)
    and shared by every connection, which takes it read-only.
    """
    return _tls_context(ca_file or None)


@functools.cache
def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"SENDGRID_CA_FILE {ca_file!r}: {exc}") from exc


def classify_refusal(status: int, body: Any, headers: Any) -> Outcome:
    """An answer other than 2xx: 429 waits for the rate limit, 5xx is retried, the rest fail."""
    text = _text(body)
    if status == 429:
        return Outcome("retry", f"HTTP 429: {text}", retry_after=_rate_limit_wait(headers))
    if status >= 500:
        return Outcome("retry", f"HTTP {status}: {text}")
    return Outcome("failed", f"HTTP {status}: {text}")


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
