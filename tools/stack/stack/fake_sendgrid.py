"""A fake SendGrid v3 API for the tests and fault runs: python -m stack.fake_sendgrid PORT.

It answers POST /v3/mail/send with a scripted sequence of behaviours ("202", "429", "500",
"400", "hang"), then with a default one, and records every message it accepted. It speaks
HTTP/1.1 with keep-alive, as SendGrid does, over TLS when given a server context (`tls`, e.g.
`tls_ca.LocalCA(...).server_context()`), and counts the connections and TLS handshakes it took.

A request whose client has already hung up (it timed out while the request waited for a busy
fake) is dropped unanswered rather than accepted, as a server aborts a request whose connection
closed: the tests count acceptances, and a message accepted for a client that never heard of it
would be an artifact of the fake's own slowness, not of the sender.
"""

from __future__ import annotations

import json
import random
import select
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeSendGrid:
    """Start with start(); `url` is the SENDGRID_HOST to configure."""

    def __init__(
        self,
        port: int = 0,
        default: str = "202",
        failure_rate: float = 0.0,
        seed: int | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.script: deque[str] = deque()
        self.default, self.failure_rate = default, failure_rate
        self.rng = random.Random(seed)
        self.accepted: list[dict[str, Any]] = []
        self.requests = 0
        self.hanging = 0  # requests being held right now ("hang")
        self.abandoned = 0  # requests whose client hung up before they were handled
        self.answering = 0  # requests past the stall gate, not yet answered (hangs excluded)
        self.held = 0  # requests being held by a stall
        self.connections = 0  # TCP connections accepted
        self.handshakes = 0  # TLS handshakes completed (with `tls`)
        self.refused_handshakes = 0  # TLS handshakes that failed (e.g. the client refused us)
        self.authorizations: list[str] = []
        self.lock = threading.Lock()
        self.release = threading.Event()  # set to let hanging requests go
        self.flowing = threading.Event()  # cleared by stall(): every call is held meanwhile
        self.flowing.set()
        self.tls = tls
        self.server = _Server(("127.0.0.1", port), self._handler(), self)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeSendGrid:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.flowing.set()
        self.server.shutdown()
        self.server.server_close()

    def stall(self) -> None:
        """Hold every call from now on, unanswered, until resume(): SendGrid stops responding.

        Calls that got past the gate before are still answered: `answering` counts them."""
        with self.lock:
            self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def then(self, *behaviours: str) -> FakeSendGrid:
        with self.lock:
            self.script.extend(behaviours)
        return self

    def accepted_to(self, email: str) -> int:
        with self.lock:
            return sum(
                1 for m in self.accepted if m["personalizations"][0]["to"][0]["email"] == email
            )

    def _next(self) -> str:
        with self.lock:
            self.requests += 1
            if self.script:
                return self.script.popleft()
        if self.failure_rate and self.rng.random() < self.failure_rate:
            return self.rng.choice(("500", "429", "hang"))
        return self.default

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, unless the client asks to close

            def log_message(self, *_args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if self.path != "/v3/mail/send":
                    return self._answer(404, {"errors": [{"message": "not found"}]})
                with fake.lock:  # atomic with stall(): a call is either held or answering
                    fake.authorizations.append(self.headers.get("Authorization", ""))
                    flowing = fake.flowing.is_set()
                    if flowing:
                        fake.answering += 1
                    else:
                        fake.held += 1
                if not flowing:
                    fake.flowing.wait(30)
                    with fake.lock:
                        fake.held -= 1
                    return None  # the client gave up long ago: no answer
                behaviour = fake._next()
                if behaviour == "hang":
                    with fake.lock:
                        fake.answering -= 1  # never answered: not waited for
                        fake.hanging += 1
                    fake.release.wait(30)  # longer than any client timeout in the tests
                    with fake.lock:
                        fake.hanging -= 1
                    return None
                try:
                    return self._behave(behaviour, body)
                finally:
                    with fake.lock:
                        fake.answering -= 1

            def _behave(self, behaviour: str, body: bytes) -> None:
                # Broken answers: a body cut short (IncompleteRead), a status line that is not
                # HTTP (BadStatusLine), the connection closed unanswered (RemoteDisconnected).
                if behaviour == "incomplete":
                    self.wfile.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\n{")
                    self.close_connection = True
                    return None
                if behaviour == "garbage":
                    self.wfile.write(b"SMTP is not HTTP\r\n\r\n")
                    self.close_connection = True
                    return None
                if behaviour == "disconnect":
                    self.close_connection = True
                    return None
                if behaviour == "429":
                    reset = str(int(time.time()) + 1)
                    return self._answer(
                        429,
                        {"errors": [{"message": "too many requests"}]},
                        {
                            "X-RateLimit-Limit": "600",
                            "X-RateLimit-Remaining": "0",
                            "X-RateLimit-Reset": reset,
                        },
                    )
                if behaviour == "500":
                    return self._answer(500, {"errors": [{"message": "internal error"}]})
                if behaviour == "400":
                    return self._answer(
                        400,
                        {
                            "errors": [
                                {
                                    "message": "The from address does not match a verified Sender",
                                    "field": "from",
                                    "help": None,
                                }
                            ]
                        },
                    )
                message = json.loads(body)
                if self._client_gone():
                    with fake.lock:
                        fake.abandoned += 1
                    return None
                with fake.lock:
                    fake.accepted.append(message)
                return self._answer(202, None, {"X-Message-Id": uuid.uuid4().hex})

            def _client_gone(self) -> bool:
                """The client closed its connection: readable, and nothing but the end."""
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable:
                    return False
                if isinstance(self.connection, ssl.SSLSocket):
                    # No peeking into TLS; a client waiting for its answer sends nothing, so
                    # bytes arriving now are its close_notify or FIN.
                    return True
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def _answer(self, status: int, payload: Any, headers: dict | None = None) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


class _Server(ThreadingHTTPServer):
    """A thread per connection; with TLS, the handshake runs in that thread, not the accept
    loop, so a client that never completes one holds back no other."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, fake: FakeSendGrid) -> None:
        super().__init__(address, handler)
        self.fake = fake

    def finish_request(self, request: Any, client_address: Any) -> None:
        fake = self.fake
        with fake.lock:
            fake.connections += 1
        if fake.tls is None:
            return super().finish_request(request, client_address)
        request.settimeout(10)  # a handshake that never comes ends this thread
        try:
            secured = fake.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            with fake.lock:
                fake.refused_handshakes += 1
            return None
        with fake.lock:
            fake.handshakes += 1
        secured.settimeout(None)
        try:
            super().finish_request(secured, client_address)
        finally:
            secured.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away mid-request (a reset kept-alive connection)
        super().handle_error(request, client_address)


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8109
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    fake = FakeSendGrid(port, failure_rate=rate).start()
    print(f"fake SendGrid on {fake.url} (failure rate {rate})", flush=True)
    threading.Event().wait()
