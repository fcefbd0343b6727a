"""Where the console sends a browser after signing in (`next`) and after a retry (`back`): only
to its own pages, read the way a browser reads the address (tabs and newlines dropped,
backslashes taken as slashes)."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import pytest

pytestmark = pytest.mark.integration

CONSOLE = "http://console.localhost/"
HOSTILE = [
    "/\t/evil.example/",  # the tab a browser strips: "//evil.example/"
    "/\n/evil.example/",
    "/\r\n/evil.example/",
    "\t//evil.example/",
    " //evil.example/",
    "//evil.example/",
    "/\\evil.example/",
    "\\\\evil.example/",
    "/%2F/evil.example/",
    "/%5C/evil.example/",
    "/%09/evil.example/",
    "https://evil.example/",
    "http:/evil.example/",
    "http:evil.example",
    "javascript:alert(1)",
    "evil.example",
    "/nowhere-on-the-console",
    "/journey/../../evil",
]


def browser_reads(location: str) -> str:
    """The URL a browser goes to for this Location, as the WHATWG parser reads it."""
    cleaned = re.sub(r"[\t\n\r]", "", location.strip("".join(map(chr, range(0x21)))))
    return urljoin(CONSOLE, cleaned.replace("\\", "/"))


@pytest.mark.parametrize("target", HOSTILE)
def test_signing_in_never_sends_the_browser_off_the_console(browser, keys, target):
    form = browser.get("/signin", query_string={"next": target}).get_data(as_text=True)
    assert 'name="next" value="/"' in form
    answer = browser.sign_in(keys["admin"], next_=target)
    assert answer.status_code == 302
    assert answer.headers["Location"] == "/"
    assert urlsplit(browser_reads(answer.headers["Location"])).netloc == "console.localhost"


def test_the_reviewed_case_lands_on_the_overview(browser, keys):
    """GET /signin?next=/%09/evil.example/ then the form's POST gave Location: //evil.example/."""
    page = browser.client.get("/signin?next=/%09/evil.example/", environ_base=browser.environ)
    assert "evil.example" not in page.get_data(as_text=True)
    answer = browser.post(
        "/signin",
        data={"csrf": browser.token(), "key": keys["admin"], "next": "/\t/evil.example/"},
    )
    assert answer.headers["Location"] == "/"


@pytest.mark.parametrize(
    ("target", "lands"),
    [
        ("/journey?q=12345678909", "/journey?q=12345678909"),
        ("/failures", "/failures"),
        ("/failures/group?queue=q&group=a b", "/failures/group?queue=q&group=a+b"),
        ("/\tjourney?q=1", "/journey?q=1"),
        ("/audit#top", "/audit"),
    ],
)
def test_signing_in_returns_to_the_console_page_asked_for(browser, keys, target, lands):
    assert browser.sign_in(keys["admin"], next_=target).headers["Location"] == lands


@pytest.mark.parametrize("target", ["/\t/evil.example/", "https://evil.example/", "//evil", ""])
def test_the_retry_form_goes_back_only_to_a_console_page(
    make_app, browse, keys, notifier_api, target
):
    browser = browse(make_app(notifier_api_url=notifier_api.url))
    browser.sign_in(keys["admin"])
    answer = browser.post(
        "/emails/7/retry", data={"csrf": browser.token("/journey"), "back": target}
    )
    assert notifier_api.calls == [("POST", "/deliveries/7/retry")]
    assert answer.status_code == 302 and answer.headers["Location"] == "/journey"


def test_the_retry_form_goes_back_to_the_journey_it_was_on(make_app, browse, keys, notifier_api):
    browser = browse(make_app(notifier_api_url=notifier_api.url))
    browser.sign_in(keys["admin"])
    back = "/journey?q=12345678909"
    answer = browser.post("/emails/7/retry", data={"csrf": browser.token("/journey"), "back": back})
    assert answer.headers["Location"] == back
