"""The console's sessions, kept server-side in its own database: the cookie holds only a random
token; the table holds the token's HMAC (never the token) and what the session knows. Signing
out deletes the row, so a copied cookie is worth nothing afterwards; a session also ends
`lifetime` after it began and `idle` after its last request."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta
from typing import Any

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from werkzeug.datastructures import CallbackDict


class ServerSession(CallbackDict, SessionMixin):
    """What one browser's session knows; `renew` and `end` act on its row when it is saved."""

    def __init__(self, data: dict[str, Any] | None = None, token: str | None = None) -> None:
        def changed(_: Any) -> None:
            self.modified = True

        super().__init__(data or {}, changed)
        self.token = token  # None: no row yet
        self.new = token is None
        self.modified = False
        self.dropped: list[str] = []  # tokens whose rows go when the session is saved

    def renew(self) -> None:
        """Go on under a new token (at sign-in: one seen before it is worth nothing after)."""
        if self.token is not None:
            self.dropped.append(self.token)
        self.token = None
        self.modified = True

    def end(self) -> None:
        """Forget the session here and on the server (sign-out)."""
        self.renew()
        self.clear()


class SessionStore:
    """The sessions table: rows by the HMAC of their token, ended by time or by deletion."""

    def __init__(self, pool: ConnectionPool, secret: str, lifetime: int, idle: int) -> None:
        self.pool, self._secret = pool, secret.encode()
        self.lifetime, self.idle = timedelta(seconds=lifetime), timedelta(seconds=idle)

    def _id(self, token: str) -> str:
        return hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()

    def load(self, token: str) -> dict[str, Any] | None:
        """The session's data if it is still alive (and it is alive for `idle` longer)."""
        with self.pool.connection() as conn:
            row = conn.execute(
                "UPDATE sessions SET seen_at = now() "
                "WHERE id = %s AND expires_at > now() AND seen_at > now() - %s "
                "RETURNING data",
                (self._id(token), self.idle),
            ).fetchone()
        return row[0] if row else None

    def create(self, data: dict[str, Any]) -> str:
        """A new session's token; sessions past their time go at the same moment."""
        token = secrets.token_urlsafe(32)
        with self.pool.connection() as conn:
            conn.execute(
                "DELETE FROM sessions WHERE expires_at <= now() OR seen_at <= now() - %s",
                (self.idle,),
            )
            conn.execute(
                "INSERT INTO sessions (id, data, expires_at) VALUES (%s, %s, now() + %s)",
                (self._id(token), Jsonb(data), self.lifetime),
            )
        return token

    def save(self, token: str, data: dict[str, Any]) -> None:
        with self.pool.connection() as conn:
            conn.execute(
                "UPDATE sessions SET data = %s WHERE id = %s", (Jsonb(data), self._id(token))
            )

    def delete(self, token: str) -> None:
        with self.pool.connection() as conn:
            conn.execute("DELETE FROM sessions WHERE id = %s", (self._id(token),))


class ServerSessions(SessionInterface):
    """Flask's session, kept in a SessionStore; the cookie is a browser-session cookie with the
    app's SESSION_COOKIE_* settings."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    def open_session(self, app: Flask, request: Request) -> ServerSession:
        token = request.cookies.get(self.get_cookie_name(app))
        if token and len(token) <= 128:
            data = self.store.load(token)
            if data is not None:
                return ServerSession(data, token)
        return ServerSession()

    def save_session(self, app: Flask, session: ServerSession, response: Response) -> None:  # type: ignore[override]
        name = self.get_cookie_name(app)
        domain, path = self.get_cookie_domain(app), self.get_cookie_path(app)
        for token in session.dropped:
            self.store.delete(token)
        if session.accessed:
            response.vary.add("Cookie")
        if not session:  # nothing to keep: no row, and no cookie for one
            if session.token is not None:
                self.store.delete(session.token)
            if not session.new:
                response.delete_cookie(name, domain=domain, path=path)
            return
        if session.token is not None:  # the browser holds its cookie already
            if session.modified:
                self.store.save(session.token, dict(session))
            return
        session.token = self.store.create(dict(session))
        response.set_cookie(
            name,
            session.token,
            domain=domain,
            path=path,
            httponly=self.get_cookie_httponly(app),
            secure=self.get_cookie_secure(app),
            samesite=self.get_cookie_samesite(app),
            partitioned=self.get_cookie_partitioned(app),
        )
