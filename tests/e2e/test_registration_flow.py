"""End to end through Traefik: registration -> welcome e-mail -> activation -> score."""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.parse

import pytest
from messaging.testing import wait_until

pytestmark = pytest.mark.e2e

SEED = {"cpf": 11111, "name": "abc", "address": "abc", "date_of_birth": "2019-06-15T19:23:55-03:00"}


def test_registration_email_activation_and_score(stack):
    status, person, headers = stack.call(
        "POST",
        "person",
        "/person",
        {
            "cpf": "123.456.789-09",
            "name": "Maria Silva",
            "address": "Recife",
            "date_of_birth": "1990-04-12",
            "email": "maria@example.com",
        },
        headers={"X-Request-Id": "e2e-registration"},
    )
    assert status == 201 and person["status"] == "pending"
    assert headers["X-Request-Id"] == "e2e-registration"

    def welcome_link() -> str | None:
        _, box, _ = stack.call("GET", "notifier", "/mailbox?to=maria@example.com")
        return box["messages"][0]["links"][0] if box["messages"] else None

    link = urllib.parse.urlsplit(wait_until(welcome_link, what="the welcome e-mail"))
    assert link.netloc == f"person.localhost:{stack.port}"
    status, page, _ = stack.call("GET", "person", f"{link.path}?{link.query}")
    assert status == 200 and "Account activated" in page

    for kind, body in (
        ("income", {"type": "renting", "value": 1000}),
        ("asset", {"type": "apartment", "value": 100000}),
        ("debt", {"value": 1000}),
    ):
        assert stack.call("POST", "person", f"/person/12345678909/{kind}", body)[0] == 201

    def score() -> int | None:
        status, body, _ = stack.call("GET", "score", "/12345678909/score")
        return body["score"] if status == 200 and body["debts"] != "0.00" else None

    assert wait_until(score, what="the score") == 4970

    def view() -> dict | None:
        status, body, _ = stack.call("GET", "notifier", "/users/12345678909")
        return body if status == 200 and body["status"] == "active" else None

    assert wait_until(view, what="the activated view")["welcome_email"]["status"] == "sent"


def test_the_seeds_four_calls_and_an_independent_second_person(stack):
    assert stack.call("POST", "person", "/person", SEED)[0] == 201
    for kind, body in (
        ("income", {"type": "renting", "value": 1000}),
        ("asset", {"type": "apartment", "value": 100000}),
        ("debt", {"value": 1000}),
    ):
        assert stack.call("POST", "person", f"/person/11111/{kind}", body)[0] == 201
    assert stack.call("POST", "person", "/person", {**SEED, "cpf": 22222})[0] == 201
    assert (
        stack.call("POST", "person", "/person/22222/income", {"type": "salary", "value": 500})[0]
        == 201
    )

    def scores() -> tuple | None:
        first = stack.call("GET", "score", "/11111/score")
        second = stack.call("GET", "score", "/22222/score")
        if first[0] == second[0] == 200 and first[1]["debts"] != "0.00" and second[1]["score"]:
            return first[1]["score"], second[1]["score"]
        return None

    assert wait_until(scores, what="both scores") == (4970, 10)


def test_deleting_a_person_removes_it_from_both_read_models(stack):
    assert (
        stack.call("POST", "person", "/person", {**SEED, "cpf": 33333, "email": "del@example.com"})[
            0
        ]
        == 201
    )
    wait_until(lambda: stack.call("GET", "notifier", "/users/33333")[0] == 200, what="view")
    wait_until(lambda: stack.call("GET", "score", "/33333/score")[0] == 200, what="score")
    assert stack.call("DELETE", "person", "/person/33333")[0] == 204
    wait_until(lambda: stack.call("GET", "score", "/33333/score")[0] == 404, what="score gone")
    wait_until(lambda: stack.call("GET", "notifier", "/users/33333")[0] == 404, what="view gone")


@pytest.mark.parametrize("host", ["person", "score", "notifier"])
def test_each_services_root_url_is_swagger_ui_with_assets_of_its_own(stack, host):
    # tests/e2e/test_console_browser.py sees it render the operations in a browser.
    status, page, headers = stack.call("GET", host, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert any(asset.endswith("/swagger-ui-bundle.js") for asset in assets), page
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), asset  # no other host
        assert stack.call("GET", host, asset)[0] == 200, asset


def test_every_service_is_ready_and_unknown_hosts_are_not_routed(stack):
    for host in ("person", "score", "notifier"):
        # /ready includes "is my consumer attached", which the consumer reports once it is.
        wait_until(lambda h=host: stack.call("GET", h, "/ready")[0] == 200, what=f"{host} ready")
    assert stack.call("GET", "elsewhere", "/health")[0] == 404


def gateway_refusal(port: int, path: str, chunked: bool) -> tuple[int, dict[str, str], bytes]:
    """POST a body of 2 MB to person.localhost through the gateway, as curl sends a large one:
    declared up front with "Expect: 100-continue" (Traefik answers from Content-Length alone,
    before a byte of it is sent), or chunked (Traefik counts it as it arrives)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("POST", path, skip_host=True)
        connection.putheader("Host", "person.localhost")
        connection.putheader("Content-Type", "application/json")
        if chunked:
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
            chunk = b"[" + b" " * 65_536
            try:
                for _ in range(32):
                    connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                connection.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # Traefik answered and closed before the rest: its answer is there
        else:
            connection.putheader("Content-Length", str(2_000_000))
            connection.putheader("Expect", "100-continue")
            connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_traefik_refuses_a_body_over_its_limit_in_the_contracts_shape(stack, chunked):
    # Traefik's own answer (the gateway's limit, 1 MiB here), not the service's: the services'
    # JSON error shape all the same (the gateway-errors plugin), not Traefik's plain text.
    status, headers, raw = gateway_refusal(stack.port, "/person", chunked)
    assert status == 413, raw
    assert headers["Content-Type"] == "application/json"
    body = json.loads(raw)
    assert body == {"message": body["message"], "errors": {}}
    assert body["message"].startswith("the body is too large for the gateway"), body


def test_a_services_own_413_keeps_its_message(stack):
    # Under the gateway's limit but over the service's MAX_BODY_BYTES: the service's answer.
    padded = {"cpf": "1", "name": "x" * 600_000, "address": "a", "date_of_birth": "1990-01-01"}
    status, body, headers = stack.call("POST", "person", "/person", padded)
    assert (status, body) == (413, {"message": "the body is too large", "errors": {}})
    assert headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    "headers",
    [{"x-death": 5}, {"x-death": [{"count": "3"}]}, {"x-attempts": "five"}],
    ids=["x-death-integer", "count-text", "x-attempts-text"],
)
def test_a_message_with_a_malformed_header_is_dead_lettered_and_writes_keep_flowing(stack, headers):
    import pika
    from messaging.topology import Topology

    queue = Topology("score", stack.env["EVENTS_EXCHANGE"]).queue
    conn = pika.BlockingConnection(pika.URLParameters(stack.env["AMQP_URL"]))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        # Counted before publishing: the consumer may dead-letter it at once.
        dead = channel.queue_declare(f"{queue}.dead", passive=True).method.message_count
        channel.basic_publish(
            "", queue, b"{garbage", pika.BasicProperties(delivery_mode=2, headers=headers)
        )
    finally:
        conn.close()
    cpf = str(30_000 + len(str(headers)))
    body = {"cpf": cpf, "name": "H", "address": "a", "date_of_birth": "1990-01-01"}
    assert stack.call("POST", "person", "/person", body)[0] == 201
    assert (
        stack.call("POST", "person", f"/person/{cpf}/asset", {"type": "t", "value": 40})[0] == 201
    )

    def scored() -> bool:
        status, found, _ = stack.call("GET", "score", f"/{cpf}/score")
        return status == 200 and found["score"] == 2

    wait_until(scored, what="the write after the malformed message")
    assert stack.call("GET", "score", "/ready")[1]["status"] == "ready"

    def dead_lettered() -> bool:
        conn = pika.BlockingConnection(pika.URLParameters(stack.env["AMQP_URL"]))
        try:
            channel = conn.channel()
            return channel.queue_declare(f"{queue}.dead", passive=True).method.message_count > dead
        finally:
            conn.close()

    wait_until(dead_lettered, what="the malformed message in the dead queue")


def test_an_item_worth_zero_scores_zero(stack):
    body = {"cpf": "40404", "name": "Z", "address": "a", "date_of_birth": "1990-01-01"}
    assert stack.call("POST", "person", "/person", body)[0] == 201
    item = {"type": "gift", "value": 0}
    assert stack.call("POST", "person", "/person/40404/income", item)[0] == 201

    def score() -> dict | None:
        status, found, _ = stack.call("GET", "score", "/40404/score")
        return found if status == 200 and found["version"] >= 2 else None

    assert wait_until(score, what="the score with the zero income") == {
        "cpf": "40404",
        "score": 0,
        "incomes": "0.00",
        "assets": "0.00",
        "debts": "0.00",
        "version": 2,
        "person_version": 1,
    }


def test_make_down_leaves_no_process_and_up_twice_is_harmless(stack):
    again = stack.control("up")
    assert again.returncode == 0 and "already running" in again.stdout
    pid = int((stack.run_dir / "honcho.pid").read_text())
    assert stack.control("down").returncode == 0
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert stack.control("up").returncode == 0  # the fixture's own teardown stops it again
