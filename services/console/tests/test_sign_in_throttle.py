"""Failed sign-ins (the form, or a bearer key on a page) are audited with the client's address,
and past CONSOLE_SIGNIN_FAILURES within the window that client gets 429 with Retry-After, even
with the right key, until the oldest failure leaves the window."""

from __future__ import annotations

import psycopg
import pytest

pytestmark = pytest.mark.integration

MOST = 3


@pytest.fixture
def app(make_app):
    return make_app(console_signin_failures=MOST, console_signin_window_seconds=600)


def failures(browser) -> list[dict]:
    return [r for r in browser.audit() if r["action"] == "sign in failed"]


def test_a_failed_sign_in_is_audited_with_the_clients_address_and_never_the_key(browser, keys):
    assert browser.sign_in("mk_not-a-key-at-all").status_code == 401
    assert browser.sign_in(keys["reader"]).status_code == 401
    rows = failures(browser)
    assert [r["who"] for r in rows] == ["client 192.0.2.10"] * 2
    assert rows[0]["detail"] == "sign-in form: an unknown key"
    assert rows[1]["detail"].startswith("sign-in form: key ") and "no admin" in rows[1]["detail"]
    text = repr(browser.audit())
    assert keys["reader"] not in text and "mk_not-a-key-at-all" not in text


def test_past_the_limit_the_client_waits_even_with_the_right_key(browser, browse, app, keys):
    for _ in range(MOST):
        assert browser.sign_in("mk_wrong").status_code == 401
    refused = browser.sign_in(keys["admin"])
    assert refused.status_code == 429
    assert 590 <= int(refused.headers["Retry-After"]) <= 600
    assert "too many failed sign-ins" in refused.get_data(as_text=True)
    assert browser.get("/").status_code == 302  # not signed in
    throttled = [r for r in browser.audit() if r["action"] == "sign in throttled"]
    assert [r["who"] for r in throttled] == ["client 192.0.2.10"]
    assert len(failures(browser)) == MOST  # a refused attempt is not counted again
    elsewhere = browse(app, "198.51.100.20")  # another client is not held up
    assert elsewhere.sign_in(keys["admin"]).status_code == 302


def test_the_wait_ends_when_the_oldest_failure_leaves_the_window(
    browser, keys, console_db, administrator
):
    for _ in range(MOST):
        browser.sign_in("mk_wrong")
    assert browser.sign_in(keys["admin"]).status_code == 429
    with psycopg.connect(administrator(console_db)) as conn:  # the log is append-only
        conn.execute(
            "UPDATE audit SET at = at - interval '10 minutes' WHERE id = "
            "(SELECT min(id) FROM audit WHERE action = 'sign in failed')"
        )
    assert browser.sign_in(keys["admin"]).status_code == 302


def test_a_wrong_bearer_key_on_a_page_counts_as_a_failed_sign_in(browser, keys):
    for key in ("mk_wrong", keys["reader"], "mk_wrong"):
        answer = browser.get("/audit", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 302  # to the sign-in page, as without a key
    assert [r["detail"].split(":")[0] for r in failures(browser)] == ["bearer key"] * MOST
    answer = browser.get("/audit", headers={"Authorization": f"Bearer {keys['admin']}"})
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) > 0


def test_the_client_is_the_address_the_gateway_adds_not_one_the_client_claims(browse, app):
    behind = browse(app, "127.0.0.1")  # Traefik, in front of the console
    for n in range(MOST):
        behind.client.post(
            "/signin",
            data={"csrf": behind.token(), "key": "mk_wrong"},
            headers={"X-Forwarded-For": f"10.9.9.{n}, 203.0.113.7"},  # Traefik adds the last
            environ_base=behind.environ,
        )
    assert {r["who"] for r in failures(behind)} == {"client 203.0.113.7"}
    answer = behind.client.post(
        "/signin",
        data={"csrf": behind.token(), "key": "mk_wrong"},
        headers={"X-Forwarded-For": "10.1.1.1, 203.0.113.7"},
        environ_base=behind.environ,
    )
    assert answer.status_code == 429
