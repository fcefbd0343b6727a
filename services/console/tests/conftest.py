"""Fixtures of the console's tests: the app create_app builds, with API keys on, on a database of
its own; a fake notifier API that answers a retry, a fake person API that answers the outbox's
routes; reading the audit log."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from console.app import create_app
from console.config import ConsoleConfig
from console.migrate import migrate_database
from flask import Flask
from psycopg.rows import dict_row
from servicekit.auth import new_key

CLOSED = "http://127.0.0.1:9"  # an API that is not running


@pytest.fixture
def keys() -> dict[str, str]:
    """Keys of each kind, and API_KEYS (`entries`) holding their digests."""
    admin, admin_entry = new_key(["admin"])
    reader, reader_entry = new_key(["person:read"])
    return {"admin": admin, "reader": reader, "entries": json.dumps(admin_entry | reader_entry)}


@pytest.fixture
def console_db(make_database, service_url) -> str:
    url = make_database("console")
    migrate_database(url)  # the migrate step's; the console's own start finds it current
    return service_url(url, "console", append_only=("audit",))


@pytest.fixture
def make_app(console_db, keys) -> Iterator[Callable[..., Flask]]:
    """The console as gunicorn builds it, API keys on; `changes` are ConsoleConfig fields."""
    made: list[Flask] = []

    def make(**changes: Any) -> Flask:
        settings = {
            "console_database_url": console_db,
            "person_api_url": CLOSED,
            "score_api_url": CLOSED,
            "notifier_api_url": CLOSED,
            "api_keys": keys["entries"],
            **changes,
        }
        app = create_app(ConsoleConfig(**settings))
        app.testing = True
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["console.audit"].pool.close()


@pytest.fixture
def app(make_app) -> Flask:
    return make_app()


def csrf(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


class Browser:
    """A test client used as an operator's browser is, with what the tests read back."""

    def __init__(self, app: Flask, console_db: str, address: str = "192.0.2.10") -> None:
        self.app, self.console_db = app, console_db
        self.client = app.test_client()
        self.environ = {"REMOTE_ADDR": address}

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, environ_base=self.environ, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.client.post(path, environ_base=self.environ, **kwargs)

    def token(self, path: str = "/signin", **kwargs: Any) -> str:
        """The CSRF token of the form on a page."""
        return csrf(self.get(path, **kwargs).get_data(as_text=True))

    def sign_in(self, key: str, next_: str | None = None) -> Any:
        """Sign in through the form; the answer to its POST."""
        query = {"next": next_} if next_ is not None else {}
        data = {"csrf": self.token("/signin", query_string=query), "key": key}
        if next_ is not None:
            data["next"] = next_
        return self.post("/signin", data=data)

    def cookie(self) -> str | None:
        found = self.client.get_cookie("console")
        return found.value if found else None

    def audit(self) -> list[dict[str, Any]]:
        with psycopg.connect(self.console_db) as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT * FROM audit ORDER BY id")
            return cur.fetchall()


@pytest.fixture
def browse(console_db) -> Callable[..., Browser]:
    """A browser on an app of the test's own (`browse(make_app(...))`)."""
    return lambda app, address="192.0.2.10": Browser(app, console_db, address)


@pytest.fixture
def browser(app, browse) -> Browser:
    return browse(app)


class FakeNotifier:
    """The notifier's API as far as the console's retry button uses it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.status = 202
        self.on_call: Callable[[], None] = lambda: None  # what a test looks at meanwhile
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                fake.calls.append(("POST", self.path))
                fake.on_call()
                body = json.dumps({"message": "queued again"}).encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def notifier_api() -> Iterator[FakeNotifier]:
    fake = FakeNotifier()
    yield fake
    fake.stop()


class FakePerson:
    """The person API as far as the console reads the outbox through it: GET /outbox and
    GET /outbox/history (the events a test gives it, as the real route selects them)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []  # (the CPF its data names, event)
        self.outbox: dict[str, Any] = {
            "backlog": 0,
            "oldest_age_seconds": 0.0,
            "published": 0,
            "last_published_at": None,
            "parked_count": 0,
            "parked": [],
        }
        self.status = 200
        self.calls: list[tuple[str, str | None]] = []  # (path and query, Authorization)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.calls.append((self.path, self.headers.get("Authorization")))
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/outbox":
                    answer: Any = fake.outbox
                elif url.path == "/outbox/history":
                    answer = {"events": fake.history(query)}
                else:
                    answer = {"message": "not found", "errors": {}}
                body = json.dumps(answer).encode()
                self.send_response(fake.status if url.path.startswith("/outbox") else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def history(self, query: dict[str, str]) -> list[dict[str, Any]]:
        cpf, request = query.get("cpf"), query.get("correlation_id")
        return [
            event
            for about, event in self.events
            if (cpf and about == cpf) or (request and event["correlation_id"] == request)
        ]

    def add(self, event_type: str, entity_id: str, cpf: str | None = None, **fields: Any) -> dict:
        """An event in the outbox, unpublished unless `published_at` is given."""
        event = {
            "id": len(self.events) + 1,
            "event_id": f"00000000-0000-4000-8000-{len(self.events) + 1:012d}",
            "event_type": event_type,
            "entity": event_type.partition(".")[0],
            "entity_id": entity_id,
            "entity_version": 1,
            "occurred_at": "2026-12-07T10:00:00+00:00",
            "published_at": None,
            "correlation_id": None,
            **fields,
        }
        self.events.append((cpf or entity_id, event))
        return event

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def person_api() -> Iterator[FakePerson]:
    fake = FakePerson()
    yield fake
    fake.stop()
