"""API keys with scopes: `Authorization: Bearer <key>`, checked per route.

`API_KEYS` is a JSON object mapping the SHA-256 hex digest of each key to its list of scopes;
keys themselves are never stored or logged. Each route declares what it needs next to itself,
with `@requires("scope")` or `@public`; access.py checks them on each request, and docs.py
refuses to start an app with a route that declares neither and writes each route's requirement
into the OpenAPI document. Which scopes exist is the services' business: this module only
checks that a key holds the one a route names.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

PUBLIC = "public"  # the declaration of a route anyone may call
_DIGEST = re.compile(r"[0-9a-f]{64}")
_SCOPE = re.compile(r"[a-z][a-z0-9_-]*(:[a-z][a-z0-9_-]*)?")
KEY_PREFIX = "mk_"


def requires(scope: str) -> Callable[[F], F]:
    """Declare the scope a route needs (the decorator goes under the route's own)."""
    if not _SCOPE.fullmatch(scope):
        raise ValueError(f"not a scope: {scope!r}")

    def mark(view: F) -> F:
        view.required_scope = scope  # type: ignore[attr-defined]
        return view

    return mark


def public(view: F) -> F:
    """Declare a route open to anyone (its credential, if any, is in the request itself)."""
    view.required_scope = PUBLIC  # type: ignore[attr-defined]
    return view


def declared_scope(view: Any) -> str | None:
    return getattr(view, "required_scope", None)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who called: the digest of their key (never the key) and its scopes."""

    key_digest: str
    scopes: frozenset[str]


ANONYMOUS = Principal("", frozenset())


class ApiKeys:
    """The keys a service accepts; compares digests in constant time."""

    def __init__(self, keys: dict[str, frozenset[str]]) -> None:
        self._keys = list(keys.items())

    @classmethod
    def parse(cls, text: str) -> ApiKeys:
        """API_KEYS as JSON; ValueError naming what is wrong (never echoing a digest)."""
        try:
            raw = json.loads(text)
        except ValueError:
            raise ValueError("API_KEYS must be a JSON object of key digests to scopes") from None
        if not isinstance(raw, dict) or not raw:
            raise ValueError("API_KEYS must be a non-empty JSON object of key digests to scopes")
        keys: dict[str, frozenset[str]] = {}
        for number, (key_digest, scopes) in enumerate(raw.items(), start=1):
            if not isinstance(key_digest, str) or not _DIGEST.fullmatch(key_digest):
                raise ValueError(f"API_KEYS entry {number}: not a SHA-256 hex digest")
            if (
                not isinstance(scopes, list)
                or not scopes
                or not all(isinstance(s, str) and _SCOPE.fullmatch(s) for s in scopes)
            ):
                raise ValueError(f"API_KEYS entry {number}: scopes must be a list of scope names")
            keys[key_digest] = frozenset(scopes)
        return cls(keys)

    def scopes_of(self, key_digest: str) -> frozenset[str] | None:
        """The scopes of the key with this digest (a session that signed in with it)."""
        found = None
        for stored, scopes in self._keys:
            if hmac.compare_digest(key_digest.encode(), stored.encode()):
                found = scopes
        return found

    def verify(self, authorization: str | None) -> Principal | None:
        """The principal of an `Authorization: Bearer <key>` header, or None."""
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or len(key) > 200:
            return None
        presented = digest(key).encode()
        found = None
        for key_digest, scopes in self._keys:  # every entry, so the time says nothing
            if hmac.compare_digest(presented, key_digest.encode()):
                found = Principal(key_digest, scopes)
        return found


def new_key(scopes: list[str]) -> tuple[str, dict[str, list[str]]]:
    """A fresh random key and its API_KEYS entry."""
    for scope in scopes:
        if not _SCOPE.fullmatch(scope):
            raise ValueError(f"not a scope: {scope!r}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, {digest(key): sorted(set(scopes))}
