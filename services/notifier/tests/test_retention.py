"""Integration: the sender's retention blanks settled e-mail texts and empties the mailbox."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import psycopg
import pytest
from messaging import digests
from messaging.testing import wait_until
from notifier.sender import pruner

pytestmark = pytest.mark.integration


def delivery(conn: psycopg.Connection, status: str, days_old: float) -> int:
    return conn.execute(
        "INSERT INTO deliveries (kind, cpf, event_id, to_email, subject, html, text, status, "
        "created_at) VALUES ('activation', '11111', gen_random_uuid(), 'ana@example.com', 'hi', "
        "'<p>link</p>', 'link', %s, "
        "now() - make_interval(secs => %s)) RETURNING id",
        (status, days_old * 86_400),
    ).fetchone()[0]


def mail(conn: psycopg.Connection, days_old: float) -> int:
    delivery_id = delivery(conn, "sent", 0)
    return conn.execute(
        "INSERT INTO mailbox (delivery_id, to_email, from_email, subject, html, text, "
        "received_at) VALUES (%s, 'ana@example.com', 'no-reply@example.com', 'hi', '<p>x</p>', "
        "'x', now() - make_interval(secs => %s)) RETURNING id",
        (delivery_id, days_old * 86_400),
    ).fetchone()[0]


def texts(conn: psycopg.Connection) -> dict[int, tuple[str, str, str]]:
    rows = conn.execute("SELECT id, status, html, text FROM deliveries").fetchall()
    return {i: (status, html, text) for i, status, html, text in rows}


def mailbox_ids(conn: psycopg.Connection) -> set[int]:
    return {i for (i,) in conn.execute("SELECT id FROM mailbox").fetchall()}


def test_settled_deliveries_older_than_the_retention_keep_their_row_but_not_their_text(
    config, store, notifier_db
):
    config = config.model_copy(update={"delivery_text_retention_days": 7, "retention_batch": 2})
    with psycopg.connect(notifier_db, autocommit=True) as conn:
        old = {status: delivery(conn, status, 8) for status in ("sent", "cancelled", "suppressed")}
        old_failed, old_pending = delivery(conn, "failed", 8), delivery(conn, "pending", 8)
        recent = delivery(conn, "sent", 6)

        pruned = pruner(store.pool, config).run_once()

        rows = texts(conn)
    assert pruned["delivery e-mail texts"] == 3  # in batches of two
    for status, delivery_id in old.items():
        assert rows[delivery_id] == (status, "", "")
    for kept in (old_failed, old_pending, recent):  # a failed one may be sent again
        assert rows[kept][1:] == ("<p>link</p>", "link")


def test_settled_deliveries_older_than_the_retention_forget_the_name_they_greet(
    config, store, notifier_db, view, person_event
):
    config = config.model_copy(update={"delivery_text_retention_days": 7})
    statuses = {"70": "sent", "71": "cancelled", "72": "failed", "73": "pending", "74": "sent"}
    for cpf in statuses:
        view(person_event(cpf, name="Ana Maria", email=f"a{cpf}@example.com"))
    with psycopg.connect(notifier_db, autocommit=True) as conn:
        for cpf, status in statuses.items():
            days = 6 if cpf == "74" else 8
            conn.execute(
                "UPDATE deliveries SET status = %s, "
                "created_at = now() - make_interval(secs => %s) WHERE cpf = %s",
                (status, days * 86_400, cpf),
            )

        pruned = pruner(store.pool, config).run_once()

        names = dict(conn.execute("SELECT cpf, name FROM deliveries").fetchall())
    assert pruned["delivery names"] == 2
    assert names == {
        "70": None,
        "71": None,
        "72": "Ana Maria",
        "73": "Ana Maria",
        "74": "Ana Maria",
    }


def test_mailbox_e_mails_older_than_the_retention_are_deleted(config, store, notifier_db):
    config = config.model_copy(update={"mailbox_retention_days": 7})
    with psycopg.connect(notifier_db, autocommit=True) as conn:
        old = {mail(conn, 8) for _ in range(3)}
        recent = mail(conn, 6)

        pruned = pruner(store.pool, config).run_once()

        assert mailbox_ids(conn) == {recent}
    assert pruned["mailbox e-mails"] == len(old)


def test_one_row_that_cannot_be_pruned_does_not_stop_the_others(config, store, notifier_db):
    config = config.model_copy(update={"mailbox_retention_days": 7, "retention_batch": 2})
    with psycopg.connect(notifier_db, autocommit=True) as conn:
        ids = [mail(conn, 8) for _ in range(5)]
        bad = ids[1]
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF OLD.id = {bad} THEN RAISE EXCEPTION 'a bad row'; END IF; RETURN OLD; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE DELETE ON mailbox FOR EACH ROW EXECUTE FUNCTION refuse()"
        )

        pruned = pruner(store.pool, config).run_once()

        assert mailbox_ids(conn) == {bad}
    assert pruned["mailbox e-mails"] == 4


def person(store, cpf: str, version: int, deleted: bool, days_old: float = 0) -> None:
    """The view applies a person's event (a deletion leaves a tombstone), `days_old` ago."""
    state = None if deleted else {"name": "Ana", "email": None, "status": "pending"}
    with store.transaction() as cur:
        store.apply_person(cur, uuid.uuid4(), cpf, version, state)
        cur.execute(
            "UPDATE users SET updated_at = now() - make_interval(secs => %s) WHERE cpf = %s",
            (days_old * 86_400, cpf),
        )


def view_rows(conn: psycopg.Connection) -> dict[str, bool]:
    return dict(conn.execute("SELECT cpf, deleted FROM users").fetchall())


def test_tombstones_older_than_the_retention_are_deleted_unless_a_delivery_may_still_go(
    config, store, notifier_db
):
    config = config.model_copy(update={"tombstone_retention_days": 30, "retention_batch": 1})
    person(store, "1", 2, deleted=True, days_old=31)
    person(store, "2", 2, deleted=True, days_old=31)
    person(store, "3", 2, deleted=True, days_old=29)
    person(store, "4", 1, deleted=False, days_old=400)
    with psycopg.connect(notifier_db, autocommit=True) as conn:
        failed = delivery(conn, "failed", 40)
        conn.execute("UPDATE deliveries SET cpf = '2' WHERE id = %s", (failed,))
        before = store.digests({"person"})

        pruned = pruner(store.pool, config).run_once()

        # '2' keeps its tombstone while its failed e-mail may be retried: the tombstone cancels it
        assert view_rows(conn) == {"2": True, "3": True, "4": False}
    assert pruned["tombstones"] == 1
    assert store.digests({"person"}) == before == digests.of_versions([("person", "4", 1)])
    assert store.held_versions("person", list(range(digests.BUCKETS))) == {"4": 1}


def test_the_running_sender_process_prunes_at_start(notifier_db):
    with psycopg.connect(notifier_db, autocommit=True) as conn:
        mail(conn, 8)
        recent = mail(conn, 6)
    env = {
        **{k: v for k, v in os.environ.items() if k != "SENDGRID_API_KEY"},
        "NOTIFIER_DATABASE_URL": notifier_db,
        "MAILBOX_RETENTION_DAYS": "7",
    }
    process = subprocess.Popen([sys.executable, "-m", "notifier.sender"], env=env)
    try:
        with psycopg.connect(notifier_db, autocommit=True) as conn:
            wait_until(lambda: mailbox_ids(conn) == {recent}, timeout=30, what="mailbox pruned")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
