"""The console's sessions are kept server-side: the cookie is a random token, signing out ends
the session wherever its cookie was copied, and a session ends with time."""

from __future__ import annotations

import psycopg
import pytest
from servicekit.auth import digest

pytestmark = pytest.mark.integration


def signed_in(browser) -> bool:
    answer = browser.get("/")
    return answer.status_code == 200 and "sign out" in answer.get_data(as_text=True)


def copy_cookie(source, target) -> None:
    target.client.set_cookie("console", source.cookie())


def test_signing_out_ends_the_session_for_a_copied_cookie_too(browser, browse, app, keys):
    assert browser.sign_in(keys["admin"]).status_code == 302
    thief = browse(app, "203.0.113.66")
    copy_cookie(browser, thief)
    assert signed_in(thief)
    out = browser.post("/signout", data={"csrf": browser.token("/")})
    assert out.status_code == 302 and out.headers["Location"] == "/signin"
    assert browser.cookie() is None
    answer = thief.get("/")
    assert answer.status_code == 302 and answer.headers["Location"].startswith("/signin")
    assert thief.post("/rebuild", data={"csrf": "whatever"}).status_code in (400, 401)


def test_the_cookie_is_a_random_token_and_the_database_keeps_only_its_hmac(
    browser, keys, console_db
):
    browser.sign_in(keys["admin"])
    token = browser.cookie()
    assert digest(keys["admin"]) not in token and len(token) >= 40
    with psycopg.connect(console_db) as conn:
        rows = conn.execute("SELECT id, data FROM sessions").fetchall()
    assert len(rows) == 1
    stored_id, data = rows[0]
    assert stored_id != token and token not in str(data)
    assert data["key_digest"] == digest(keys["admin"])
    cookie = browser.client.get_cookie("console")
    assert cookie.http_only and cookie.same_site == "Strict" and cookie.expires is None


def test_signing_in_gives_the_browser_a_new_token(browser, browse, app, keys):
    browser.get("/signin")
    before = browser.cookie()
    browser.sign_in(keys["admin"])
    assert browser.cookie() not in (None, before)
    planted = browse(app, "203.0.113.66")  # a token planted before the operator signed in
    planted.client.set_cookie("console", before)
    assert not signed_in(planted)


@pytest.mark.parametrize(
    "aged",
    [
        "expires_at = now() - interval '1 second'",  # its lifetime is over
        "seen_at = now() - interval '31 minutes'",  # idle past CONSOLE_SESSION_IDLE_SECONDS
    ],
)
def test_a_session_ends_with_time(browser, keys, console_db, aged):
    browser.sign_in(keys["admin"])
    assert signed_in(browser)
    with psycopg.connect(console_db) as conn:
        conn.execute(f"UPDATE sessions SET {aged}")
    assert not signed_in(browser)


def test_a_session_in_use_stays_alive(browser, keys, console_db):
    browser.sign_in(keys["admin"])
    with psycopg.connect(console_db) as conn:
        conn.execute("UPDATE sessions SET seen_at = now() - interval '29 minutes'")
    assert signed_in(browser)
    with psycopg.connect(console_db) as conn:
        (idle,) = conn.execute("SELECT now() - seen_at FROM sessions").fetchone()
    assert idle.total_seconds() < 60


def test_an_unknown_or_oversized_cookie_opens_no_session(browser):
    browser.client.set_cookie("console", "x" * 4000)
    assert browser.get("/").status_code == 302
    browser.client.set_cookie("console", "not-a-token")
    assert browser.get("/").status_code == 302
