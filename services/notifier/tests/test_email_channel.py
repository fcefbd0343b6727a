"""What reaches an inbox: no person field puts a link or an address into an e-mail, the daily cap
counts a mailbox however its address is spelt, and a suppressed e-mail says why."""

from __future__ import annotations

import re

import psycopg
import pytest
from notifier.app import create_app
from notifier.consumer import UserView
from notifier.migrate import migrate_database
from notifier.store import NotifierStore

pytestmark = pytest.mark.integration

# What a mail client could make a link or an address of: a scheme, an '@', or a dot (any of the
# dots IDNA maps to '.') between two characters of a word.
LINKABLE = re.compile(r"://|[@\uff20]|www|\w[.\u3002\uff0e\uff61]\w", re.IGNORECASE)

REGISTERED = "2026-01-02T03:04:05+00:00"
HOSTILE_NAMES = [
    "Ana https://evil.example/login",
    "Maria. Your account is blocked: unblock it at evil.example/u",
    "Maria. Unblock your account at www.evil.example",
    "write to help@evil.example",
    "Ana\n\nClick http://evil.example\r\n\u2028now",
    "Ana evil\u3002example",  # an ideographic full stop, a dot to IDNA
    "Ana evil\uff0eexample",  # a fullwidth one
    "Ana help\uff20evil",  # a fullwidth at sign
    "call 1.2.3.4",
    "javascript:alert(1)",
    "<a href='https://evil.example'>Ana</a>",
    "Ana\u202eelpmaxe.live",  # a right-to-left override
    "Ana " + "a" * 200,
]


def visible(part: str, text: str) -> str:
    """What a reader sees of one part, without its activation link (the one link it must have)
    and, in HTML, without the template's markup."""
    text = re.sub(r"http://person\.test/person/\d+/activate\?token=[\w.-]+", "", text)
    return re.sub(r"<[^>]*>", " ", text) if part == "html" else text


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_no_name_puts_a_link_or_an_address_into_either_part(person_event, view, composed, name):
    view(person_event("1", name=name, created_at=REGISTERED))
    view(person_event("1", 2, "activation_requested", name=name, created_at=REGISTERED))
    found = {k: {"text": m.text, "html": m.html} for k, m in composed("1").items()}
    assert set(found) == {"welcome", "activation"}
    for kind, mail in found.items():
        for part in ("text", "html"):
            assert "evil" not in mail[part].lower(), (kind, part)
            seen = visible(part, mail[part])
            assert not LINKABLE.search(seen), (kind, part, LINKABLE.search(seen), seen)
    # The name is left out whole, not trimmed into a sentence of its own.
    assert found["welcome"]["text"].splitlines()[0] == "Welcome!"
    assert found["activation"]["text"].splitlines()[0] == "Activate your account"


@pytest.mark.parametrize(
    "name",
    ["José d'Ávila-Souza Jr.", "J. R. R. Tolkien", "Anne-Marie O\u2019Neil", "Nguyễn Văn An"],
)
def test_a_plain_name_still_greets_the_person(person_event, view, composed, name):
    view(person_event("2", name=f"  {name}\t"))
    mail = composed("2")["welcome"]
    assert mail.text.splitlines()[0] == f"Welcome, {name}!"
    escaped = name.replace("'", "&#39;")
    assert f"<h1>Welcome, {escaped}!</h1>" in mail.html


def test_the_days_cap_counts_a_mailbox_however_its_address_is_spelt(person_event, store, config):
    capped = UserView(NotifierStore(store.pool, emails_per_address_per_day=2))
    spellings = ["victim+1@gmail.com", "Victim+2@GMAIL.com", "v.i.c.t.i.m+3@googlemail.com"]
    for n, address in enumerate(spellings):
        capped(person_event(f"3{n}", email=address))
    by_cpf = {d["cpf"]: d for d in store.deliveries(None, 10)}
    assert [by_cpf[f"3{n}"]["status"] for n in range(3)] == ["pending", "pending", "suppressed"]
    reason = by_cpf["32"]["last_error"]
    assert reason.startswith("suppressed: 2 e-mails to the mailbox victim@gmail.com in 24 h"), (
        reason
    )


def test_dots_count_as_letters_outside_gmail(person_event, store, config):
    capped = UserView(NotifierStore(store.pool, emails_per_address_per_day=1))
    for cpf, address in (
        ("40", "ana.maria@corp.example"),
        ("41", "anamaria@corp.example"),  # another mailbox
        ("42", "Ana.Maria+news@Corp.Example"),  # the first one's
    ):
        capped(person_event(cpf, email=address))
    statuses = {d["cpf"]: d["status"] for d in store.deliveries(None, 10)}
    assert statuses == {"40": "pending", "41": "pending", "42": "suppressed"}


@pytest.mark.parametrize(
    ("address", "mailbox"),
    [
        ("Ana@Example.COM", "ana@example.com"),
        ("ana+news+more@example.com", "ana@example.com"),
        ("a.n.a+x@gmail.com", "ana@gmail.com"),
        ("A.N.A@GoogleMail.com", "ana@gmail.com"),
        ("a.n.a@example.com", "a.n.a@example.com"),
        ("ana@gmail.com.", "ana@gmail.com"),
        ("no-at-sign", "no-at-sign"),
    ],
)
def test_the_mailbox_of_an_address(store, address, mailbox):
    with store.pool.connection() as conn:
        assert conn.execute("SELECT mailbox_of(%s)", (address,)).fetchone()[0] == mailbox


def test_the_user_view_says_why_an_activation_email_was_suppressed(person_event, store, config):
    capped = UserView(NotifierStore(store.pool, emails_per_address_per_day=1))
    capped(person_event("5", email="bea@example.com", created_at=REGISTERED))
    capped(
        person_event("5", 2, "activation_requested", email="bea@example.com", created_at=REGISTERED)
    )
    client = create_app(config.model_copy(update={"sendgrid_api_key": None}), store).test_client()
    view = client.get("/users/5").json
    assert view["welcome_email"]["status"] == "pending"
    assert view["activation_email"]["status"] == "suppressed"
    assert "1 e-mails to the mailbox bea@example.com" in view["activation_email"]["last_error"]
    listed = client.get("/deliveries?status=suppressed&cpf=5").json["deliveries"]
    assert [d["last_error"] for d in listed] == [view["activation_email"]["last_error"]]


def test_an_email_recorded_with_a_link_from_the_name_before_the_rule_is_never_sent(
    notifier_db, view, store, person_event, administrator
):
    view(person_event("70", name="Ana"))
    view(person_event("71", name="Bea"))
    with psycopg.connect(administrator(notifier_db), autocommit=True) as conn:
        # 70's welcome as the earlier composition wrote it, with the name's link first; and the
        # database as it was before migration 010
        conn.execute(  # (rows recorded before migration 015 hold their text)
            "UPDATE deliveries SET html = '<p>Welcome</p>', "
            "text = 'Welcome, Ana https://evil.example/login!' "
            "|| E'\\n\\nhttp://person.test/person/70/activate?token=t' "
            "WHERE cpf = '70'"
        )
        conn.execute("DROP FUNCTION mailbox_of CASCADE")
        conn.execute(
            "CREATE INDEX deliveries_by_address ON deliveries (lower(to_email), created_at)"
        )
        conn.execute("DELETE FROM schema_migrations WHERE version = '010_mailbox_cap'")

    migrate_database(administrator(notifier_db))

    found = {d["cpf"]: d for d in store.deliveries(None, 10)}
    assert (
        found["70"]["status"] == "cancelled" and "before migration 010" in found["70"]["last_error"]
    )
    assert found["71"]["status"] == "pending"
    assert [d["cpf"] for d in store.claim_due(10, 300)] == ["71"]
