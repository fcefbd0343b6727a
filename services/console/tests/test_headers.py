"""What the console's answers tell the browser: a Content-Security-Policy its pages keep to (no
inline script or style), never in a frame, no copy kept, no address sent on."""

from __future__ import annotations

import re
from pathlib import Path

import console
import pytest

pytestmark = pytest.mark.integration

PAGES = ["/", "/journey", "/audit", "/signin"]


def directives(answer) -> dict[str, str]:
    policy = answer.headers["Content-Security-Policy"]
    return {part.split()[0]: part.strip() for part in policy.split(";") if part.strip()}


@pytest.mark.parametrize("path", PAGES)
def test_every_page_forbids_framing_inline_script_and_keeping_a_copy(browser, keys, path):
    browser.sign_in(keys["admin"])
    answer = browser.get(path)
    assert answer.status_code == 200
    policy = directives(answer)
    assert policy["frame-ancestors"] == "frame-ancestors 'none'"
    assert policy["script-src"] == "script-src 'self'"
    assert policy["default-src"] == "default-src 'none'"
    assert "unsafe-inline" not in answer.headers["Content-Security-Policy"]
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["Referrer-Policy"] == "no-referrer"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_redirects_and_refusals_carry_the_headers_too(browser):
    for answer in (browser.get("/journey?q=1"), browser.post("/rebuild")):
        assert answer.status_code in (302, 400, 401)
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]


def inline(text: str) -> list[str]:
    """What the policy would block: inline scripts, styles and event handlers."""
    return re.findall(r"<script(?![^>]*\bsrc=)[^>]*>|<style|\sstyle=|\son[a-z]+=", text)


@pytest.mark.parametrize(
    "template", sorted((Path(console.__file__).parent / "templates").glob("*.html")), ids=str
)
def test_no_template_has_an_inline_script_or_style(template):
    assert inline(template.read_text()) == []


@pytest.mark.parametrize("path", PAGES)
def test_the_pages_keep_to_their_policy_and_their_files_are_served(browser, keys, path):
    browser.sign_in(keys["admin"])
    page = browser.get(path).get_data(as_text=True)
    assert inline(page) == []
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        served = browser.get(asset)
        assert served.status_code == 200 and "no-store" not in served.headers.get(
            "Cache-Control", ""
        )


def test_the_overview_refreshes_from_a_script_file(browser, keys):
    browser.sign_in(keys["admin"])
    page = browser.get("/").get_data(as_text=True)
    assert 'data-refresh="/overview/live"' in page
    assert '<script src="/static/console.js"' in page
    script = browser.get("/static/console.js")
    assert script.status_code == 200 and "data-refresh" in script.get_data(as_text=True)
    assert script.mimetype in ("text/javascript", "application/javascript")


def test_signing_out_works_from_every_page(browser, keys):
    """The sign-out form in every page's header carries the session's CSRF token."""
    browser.sign_in(keys["admin"])
    page = browser.get("/audit").get_data(as_text=True)
    token = re.search(r'action="/signout"><input type="hidden" name="csrf" value="([^"]*)"', page)
    assert token and token.group(1)
    assert browser.post("/signout", data={"csrf": token.group(1)}).status_code == 302
    assert browser.get("/audit").status_code == 302
