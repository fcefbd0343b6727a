"""The sender: the real sendgrid client against a fake SendGrid API started by the tests."""

from __future__ import annotations

import logging
import socket
import threading
import time

import psycopg
import pytest
from messaging.testing import running, wait_until
from notifier.consumer import UserView
from notifier.email import composer_for
from notifier.sender import Sender, transport_for
from notifier.store import NotifierStore
from servicekit.runner import replica_id

pytestmark = pytest.mark.integration


def delivery(store, cpf: str) -> dict:
    return next(d for d in store.deliveries(None, 500) if d["cpf"] == cpf)


def sender_for(store, config) -> Sender:
    return Sender(store, config, transport_for(config))


def test_accepted_email_is_marked_sent_with_sendgrids_message_id(
    person_event, view, store, config, fake_sendgrid
):
    view(person_event("1", name="P1", email="a@example.com"))
    with running(sender_for(store, config)):
        wait_until(lambda: delivery(store, "1")["status"] == "sent", what="the e-mail sent")
    sent = delivery(store, "1")
    assert (sent["provider"], sent["attempts"]) == ("sendgrid", 1)
    assert sent["provider_message_id"]
    assert fake_sendgrid.accepted_to("a@example.com") == 1
    message = fake_sendgrid.accepted[0]
    assert {c["type"] for c in message["content"]} == {"text/plain", "text/html"}
    assert message["from"] == {"email": config.email_from}
    assert fake_sendgrid.authorizations == [f"Bearer {config.sendgrid_api_key}"]


def test_429_waits_until_the_rate_limit_resets_then_sends_once(
    person_event, view, store, config, fake_sendgrid
):
    fake_sendgrid.then("429")
    view(person_event("2", name="P2", email="b@example.com"))
    with running(sender_for(store, config)):
        wait_until(
            lambda: delivery(store, "2")["status"] == "sent",
            timeout=20,
            what="the e-mail sent after the reset",
        )
    # Being rate limited is not the e-mail's failure: one attempt, two requests.
    assert (delivery(store, "2")["attempts"], fake_sendgrid.requests) == (1, 2)
    assert fake_sendgrid.accepted_to("b@example.com") == 1


@pytest.mark.parametrize("failure", ["500", "hang"])
def test_server_errors_and_timeouts_are_retried_with_backoff(
    person_event, view, store, config, fake_sendgrid, failure
):
    fake_sendgrid.then(failure, failure)
    view(person_event("3", name="P3", email="c@example.com"))
    with running(sender_for(store, config)):
        wait_until(
            lambda: delivery(store, "3")["status"] == "sent",
            timeout=30,
            what="the e-mail sent on the third attempt",
        )
    assert delivery(store, "3")["attempts"] == 3
    assert fake_sendgrid.accepted_to("c@example.com") == 1


def test_a_400_fails_the_delivery_with_sendgrids_error_and_it_can_be_retried(
    person_event, view, store, config, fake_sendgrid
):
    fake_sendgrid.then("400")
    view(person_event("4", name="P4", email="d@example.com"))
    with running(sender_for(store, config)):
        wait_until(lambda: delivery(store, "4")["status"] == "failed", what="a failed delivery")
        failed = delivery(store, "4")
        assert "does not match a verified Sender" in failed["last_error"]
        assert fake_sendgrid.accepted_to("d@example.com") == 0
        assert store.retry(failed["id"]) == "failed"
        wait_until(lambda: delivery(store, "4")["status"] == "sent", what="the retried e-mail")
    assert fake_sendgrid.accepted_to("d@example.com") == 1


def test_a_refused_connection_is_retried_later_not_failed(
    person_event, view, store, config, fake_sendgrid
):
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    view(person_event("10", name="P10", email="j@example.com"))
    with running(sender_for(store, config.model_copy(update={"sendgrid_host": closed}))):
        wait_until(lambda: delivery(store, "10")["attempts"] >= 1, what="a refused attempt")
    refused = delivery(store, "10")
    assert refused["status"] == "pending" and refused["next_attempt_at"] is not None
    assert "refused" in refused["last_error"].lower()
    # SendGrid reachable again: the same delivery goes out once, on its next attempt.
    with running(sender_for(store, config)):
        wait_until(
            lambda: delivery(store, "10")["status"] == "sent",
            timeout=20,
            what="the e-mail sent after the refusal",
        )
    assert fake_sendgrid.accepted_to("j@example.com") == 1


def test_connections_killed_between_acceptance_and_mark_do_not_send_twice(
    person_event, view, store, config, fake_sendgrid, notifier_db
):
    """pg_terminate_backend right after SendGrid's 202: the mark is retried, not the e-mail."""
    real = transport_for(config)

    class TerminatingTransport:
        name = real.name

        def send(self, delivery):
            outcome = real.send(delivery)
            with psycopg.connect(notifier_db, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND application_name <> 'observer'"
                )
            return outcome

    def state() -> tuple[str, int]:  # on a connection of its own: the pool's are terminated
        with psycopg.connect(notifier_db, application_name="observer") as conn:
            return conn.execute(
                "SELECT status, attempts FROM deliveries WHERE cpf = '11'"
            ).fetchone()

    config = config.model_copy(update={"sender_lease_seconds": 1.0})
    view(person_event("11", name="P11", email="k@example.com"))
    with running(Sender(store, config, TerminatingTransport())):
        wait_until(lambda: state()[0] == "sent", what="the marked e-mail")
    # A lost mark would have shown: after the lease (1 s) the e-mail would have gone out again.
    assert fake_sendgrid.accepted_to("k@example.com") == 1
    assert state() == ("sent", 1)


def test_a_database_refusing_writes_longer_than_the_lease_after_acceptance_sends_once(
    person_event, view, store, config, fake_sendgrid, notifier_db, administrator
):
    """SendGrid accepted, then the database turned read-only for three leases: the 'sent' mark
    waits for it, and the e-mail is never claimed and sent again meanwhile."""
    real = transport_for(config)
    name = psycopg.conninfo.conninfo_to_dict(notifier_db)["dbname"]
    admin_url = psycopg.conninfo.make_conninfo(administrator(notifier_db), dbname="postgres")

    def read_only(on: bool) -> None:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {on}')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )

    refused_at: list[float] = []

    class RefusingAfterAcceptance:
        name = real.name

        def send(self, delivery):
            outcome = real.send(delivery)
            if not refused_at:
                read_only(True)
                refused_at.append(time.monotonic())
            return outcome

    def state() -> str:
        with psycopg.connect(notifier_db) as conn:
            return conn.execute("SELECT status FROM deliveries WHERE cpf = '12'").fetchone()[0]

    config = config.model_copy(update={"sender_lease_seconds": 1.0})
    view(person_event("12", name="P12", email="ro@example.com"))
    try:
        with running(Sender(store, config, RefusingAfterAcceptance())):
            wait_until(lambda: refused_at, what="accepted, then refused")
            wait_until(lambda: time.monotonic() > refused_at[0] + 3.0, what="three leases")
            read_only(False)
            wait_until(lambda: state() == "sent", what="the mark recorded")
    finally:
        read_only(False)
    assert fake_sendgrid.accepted_to("ro@example.com") == 1


def test_one_hanging_call_does_not_hold_back_the_others(
    person_event, view, store, config, fake_sendgrid
):
    fake_sendgrid.then("hang")
    for n in range(6):
        view(person_event(f"2{n}", name=f"P2{n}", email=f"h{n}@example.com"))
    with running(sender_for(store, config.model_copy(update={"sendgrid_timeout_seconds": 5}))):
        wait_until(lambda: fake_sendgrid.hanging == 1, what="one call held")
        # The five others go out while the first call is still held by SendGrid.
        wait_until(lambda: len(fake_sendgrid.accepted) == 5, timeout=4, what="the others sent")
        assert fake_sendgrid.hanging == 1
        fake_sendgrid.release.set()
        wait_until(
            lambda: all(delivery(store, f"2{n}")["status"] == "sent" for n in range(6)),
            timeout=20,
            what="all six sent",
        )


def test_retries_stop_at_the_attempt_limit(person_event, view, store, config, fake_sendgrid):
    config = config.model_copy(update={"sender_max_attempts": 2})
    fake_sendgrid.then("500", "500", "500")
    view(person_event("5", name="P5", email="e@example.com"))
    with running(sender_for(store, config)):
        wait_until(
            lambda: delivery(store, "5")["status"] == "failed",
            timeout=20,
            what="the delivery given up",
        )
    assert delivery(store, "5")["attempts"] == 2
    assert "HTTP 500" in delivery(store, "5")["last_error"]


def test_two_senders_deliver_each_email_exactly_once(
    person_event, view, store, config, fake_sendgrid
):
    emails = [f"p{n}@example.com" for n in range(40)]
    for n, email in enumerate(emails):
        view(person_event(f"9{n}", name=f"P9{n}", email=email))
    with running(sender_for(store, config)), running(sender_for(store, config)):
        wait_until(
            lambda: len(fake_sendgrid.accepted) >= len(emails),
            timeout=30,
            what="every e-mail accepted",
        )
        wait_until(
            lambda: all(d["status"] == "sent" for d in store.deliveries(None, 500)),
            what="every delivery marked",
        )
    assert sorted(
        m["personalizations"][0]["to"][0]["email"] for m in fake_sendgrid.accepted
    ) == sorted(emails)


def test_a_claim_left_by_a_dead_sender_is_taken_again_after_the_lease(
    person_event, view, store, config, fake_sendgrid
):
    view(person_event("6", name="P6", email="f@example.com"))
    claimed = store.claim_due(10, lease_seconds=300)  # a sender that dies right after this
    assert [d["cpf"] for d in claimed] == ["6"]
    config = config.model_copy(update={"sender_lease_seconds": 0.5})
    with running(sender_for(store, config)):
        wait_until(lambda: delivery(store, "6")["status"] == "sent", what="the reclaimed e-mail")
    assert fake_sendgrid.accepted_to("f@example.com") == 1


def test_without_an_api_key_emails_go_to_the_development_mailbox(
    person_event, view, store, config, fake_sendgrid
):
    config = config.model_copy(update={"sendgrid_api_key": None})
    view(person_event("7", name="P7", email="g@example.com"))
    with running(sender_for(store, config)):
        wait_until(lambda: store.mailbox(10), what="an e-mail in the mailbox")
    mail = store.mailbox(10)[0]
    assert (mail["to_email"], delivery(store, "7")["provider"]) == ("g@example.com", "mailbox")
    assert fake_sendgrid.requests == 0


def test_the_api_key_never_reaches_the_logs(
    person_event, view, store, config, fake_sendgrid, caplog
):
    from servicekit.runner import configure_logging

    configure_logging("DEBUG")
    caplog.set_level(logging.DEBUG)
    fake_sendgrid.then("400")
    view(person_event("8", name="P8", email="h@example.com"))
    with running(sender_for(store, config)):
        wait_until(lambda: delivery(store, "8")["status"] == "failed", what="a logged failure")
    assert caplog.records
    assert config.sendgrid_api_key not in caplog.text


def test_only_a_pending_delivery_wakes_the_senders(person_event, view, store, notifier_db):
    """A claim (matching nothing, or taking a delivery) must not wake the senders again."""
    with psycopg.connect(notifier_db, autocommit=True) as listener:
        listener.execute("LISTEN deliveries")

        def woken(timeout: float) -> bool:
            return any(True for _ in listener.notifies(timeout=timeout, stop_after=1))

        assert store.claim_due(10, lease_seconds=60) == []
        assert not woken(0.3)
        view(person_event("12", name="P12", email="l@example.com"))
        assert woken(5)
        assert [d["cpf"] for d in store.claim_due(10, lease_seconds=60)] == ["12"]
        assert not woken(0.3)


@pytest.mark.parametrize("broken", ["incomplete", "garbage", "disconnect"])
def test_a_broken_answer_is_one_failed_attempt_and_the_worker_goes_on(
    person_event, view, store, config, fake_sendgrid, broken
):
    """http.client's IncompleteRead, BadStatusLine and RemoteDisconnected are not OSErrors."""
    fake_sendgrid.then(broken, broken)
    view(person_event("31", name="P", email="broken@example.com"))
    sender = sender_for(store, config.model_copy(update={"sender_concurrency": 1}))
    with running(sender):
        wait_until(
            lambda: delivery(store, "31")["status"] == "sent",
            timeout=30,
            what="the e-mail sent on the third attempt",
        )
        assert sender.health() is None
    sent = delivery(store, "31")
    assert sent["attempts"] == 3
    assert fake_sendgrid.accepted_to("broken@example.com") == 1


def test_a_transport_that_raises_anything_costs_an_attempt_with_the_reason(
    person_event, view, store, config
):
    class Exploding:
        name = "exploding"
        calls = 0

        def send(self, _delivery):
            self.calls += 1
            raise RuntimeError("nobody saw this coming")

    transport = Exploding()
    view(person_event("32", name="P", email="x@example.com"))
    sender = Sender(store, config.model_copy(update={"sender_concurrency": 1}), transport)
    with running(sender):
        wait_until(lambda: delivery(store, "32")["attempts"] >= 2, timeout=20, what="retried")
        assert sender.health() is None
    assert "RuntimeError: nobody saw this coming" in delivery(store, "32")["last_error"]


def test_a_late_answer_cannot_undo_what_the_claim_that_took_over_recorded(
    person_event, view, store
):
    view(person_event("33", name="P", email="late@example.com"))
    [first] = store.claim_due(1, lease_seconds=300)
    with store.pool.connection() as conn:  # the lease runs out: another worker claims it
        conn.execute("UPDATE deliveries SET claimed_at = now() - interval '1 hour'")
    [second] = store.claim_due(1, lease_seconds=300)
    assert second["id"] == first["id"] and second["claim_token"] != first["claim_token"]

    assert store.mark_sent(second, "sendgrid", "m-2")
    assert not store.mark_retry(first, 10, "HTTP 500: the first worker's late answer")
    assert not store.mark_failed(first, "late")

    found = delivery(store, "33")
    assert (found["status"], found["provider_message_id"]) == ("sent", "m-2")


def test_the_sender_reports_its_health_through_a_heartbeat(person_event, view, store, config):
    sender = sender_for(store, config)
    with running(sender):
        wait_until(
            lambda: (
                store.reports("notifier-sender", within_seconds=10)
                == {replica_id(): {"health": "ok"}}
            ),
            what="a beat",
        )


def test_the_mailbox_takes_due_emails_in_batches_once_each(person_event, view, store, config):
    for n in range(5):
        view(person_event(f"30{n}", name=f"P{n}", email=f"m{n}@example.com"))
    first = store.deliver_due_to_mailbox(
        3, 300, config.email_from, composer_for(config).for_delivery
    )
    second = store.deliver_due_to_mailbox(
        3, 300, config.email_from, composer_for(config).for_delivery
    )
    assert (len(first), len(second)) == (3, 2)
    assert (
        store.deliver_due_to_mailbox(3, 300, config.email_from, composer_for(config).for_delivery)
        == []
    )
    assert sorted(m["to_email"] for m in store.mailbox(10)) == [
        f"m{n}@example.com" for n in range(5)
    ]
    assert {delivery(store, f"30{n}")["status"] for n in range(5)} == {"sent"}
    assert {delivery(store, f"30{n}")["attempts"] for n in range(5)} == {1}


def test_a_welcome_that_failed_while_the_person_was_deleted_is_never_sent(
    person_event, view, store
):
    """Being sent when the deletion came (so not cancelled by it), refused with a 5xx: given
    back for a retry, it is cancelled at the next claim instead of sent."""
    view(person_event("90", 1, "created"))
    [claimed] = store.claim_due(10, 300)
    view(person_event("90", 2, "deleted"))
    assert store.mark_retry(claimed, 0, "503 from SendGrid")
    assert store.claim_due(10, 300) == []
    assert delivery(store, "90")["status"] == "cancelled"


def test_a_welcome_that_failed_while_the_address_changed_goes_nowhere(person_event, view, store):
    at = "2026-03-01T10:00:00+00:00"
    view(person_event("91", 1, "created", email="old@example.com", created_at=at))
    [claimed] = store.claim_due(10, 300)
    view(person_event("91", 2, "activation_requested", email="new@example.com", created_at=at))
    assert store.mark_retry(claimed, 0, "503 from SendGrid")
    [again] = store.claim_due(10, 300)
    assert (again["kind"], again["to_email"]) == ("activation", "new@example.com")
    statuses = {(d["kind"], d["status"]) for d in store.deliveries(None, 10) if d["cpf"] == "91"}
    assert statuses == {("welcome", "cancelled"), ("activation", "sending")}


def test_concurrent_batch_claims_never_take_the_same_delivery(person_event, view, store):
    """Four claimers at once, each taking batches of 7 until nothing is due: every delivery is
    claimed exactly once (FOR UPDATE SKIP LOCKED in one statement)."""
    for n in range(60):
        view(person_event(f"7{n:02d}", name=f"P{n}", email=f"c{n}@example.com"))
    taken: list[list[int]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def claimer(mine: list[int]) -> None:
        start.wait()
        while batch := store.claim_due(7, lease_seconds=300):
            assert len(batch) <= 7
            mine.extend(d["id"] for d in batch)

    threads = [threading.Thread(target=claimer, args=(mine,)) for mine in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    every = [i for mine in taken for i in mine]
    assert len(every) == len(set(every)) == 60
    assert {d["status"] for d in store.deliveries(None, 100)} == {"sending"}
    assert {d["attempts"] for d in store.deliveries(None, 100)} == {1}


def test_a_batch_claims_only_current_deliveries_under_the_cap(person_event, store, config):
    """One batch over a mixed backlog: a suppressed e-mail (past the mailbox's cap) is never
    claimed, a welcome whose person was deleted or changed address is cancelled by the claim
    itself, and only the current ones are claimed, in id order."""
    capped = NotifierStore(store.pool, emails_per_address_per_day=1)
    view = UserView(capped)
    at = "2026-03-01T10:00:00+00:00"
    view(person_event("80", email="cap@example.com"))
    view(person_event("81", email="Cap+again@example.com"))  # the same mailbox: suppressed
    view(person_event("82", email="gone@example.com"))
    view(person_event("83", 1, "created", email="old@example.com", created_at=at))
    view(person_event("84", email="kept@example.com"))
    # Claimed, then refused with a 5xx while the view moved on: due again, no longer current.
    first = capped.claim_due(10, 300)
    assert [d["cpf"] for d in first] == ["80", "82", "83", "84"]
    view(person_event("82", 2, "deleted"))
    view(person_event("83", 2, "activation_requested", email="new@example.com", created_at=at))
    for claimed in first:
        assert capped.mark_retry(claimed, 0, "503 from SendGrid")
    again = capped.claim_due(10, 300)
    assert [(d["cpf"], d["kind"], d["to_email"]) for d in again] == [
        ("80", "welcome", "cap@example.com"),
        ("84", "welcome", "kept@example.com"),
        ("83", "activation", "new@example.com"),  # recorded last
    ]
    statuses = {(d["cpf"], d["kind"]): d["status"] for d in store.deliveries(None, 20)}
    assert statuses == {
        ("80", "welcome"): "sending",
        ("81", "welcome"): "suppressed",
        ("82", "welcome"): "cancelled",
        ("83", "welcome"): "cancelled",
        ("83", "activation"): "sending",
        ("84", "welcome"): "sending",
    }
    assert capped.claim_due(10, 300) == []


def test_a_claim_of_one_behind_cancelled_deliveries_still_claims(person_event, view, store):
    view(person_event("85", 1, "created", email="a@example.com"))
    view(person_event("86", 1, "created", email="b@example.com"))
    [claimed] = store.claim_due(1, 300)
    view(person_event("85", 2, "deleted"))
    assert store.mark_retry(claimed, 0, "503 from SendGrid")
    assert [d["cpf"] for d in store.claim_due(1, 300)] == ["86"]
    assert delivery(store, "85")["status"] == "cancelled"


def test_given_back_claims_are_due_again_without_an_attempt(person_event, view, store):
    for n in range(3):
        view(person_event(f"87{n}", email=f"g{n}@example.com"))
    claimed = store.claim_due(3, 300)
    assert store.mark_sent(claimed[0], "sendgrid", "m-1")
    assert store.give_back(claimed) == 2  # the sent one is left as it is
    assert [d["status"] for d in (delivery(store, f"87{n}") for n in range(3))] == [
        "sent",
        "pending",
        "pending",
    ]
    again = store.claim_due(10, 300)
    assert [(d["cpf"], d["attempts"]) for d in again] == [("871", 1), ("872", 1)]


def test_a_batch_sends_no_claim_whose_lease_would_run_out_first(
    person_event, view, store, config, fake_sendgrid
):
    """Of a batch, a claim after the first is sent only while the time since the claim plus
    two timeouts stays within the lease (the margin of a single claim); the rest is given
    back."""
    config = config.model_copy(update={"sendgrid_timeout_seconds": 0.5, "sender_lease_seconds": 2})
    sender = sender_for(store, config)
    for n in range(3):
        view(person_event(f"88{n}", email=f"l{n}@example.com"))
    sender._deliver_batch(store.claim_due(3, 2), time.monotonic())
    assert [delivery(store, f"88{n}")["status"] for n in range(3)] == ["sent"] * 3
    for n in range(3):
        view(person_event(f"89{n}", email=f"k{n}@example.com"))
    claimed_at = time.monotonic() - 1.01  # 1.01 s ago: 1.01 + 2 x 0.5 > 2, only the first
    sender._deliver_batch(store.claim_due(3, 2), claimed_at)
    assert [delivery(store, f"89{n}")["status"] for n in range(3)] == ["sent"] + ["pending"] * 2
    assert [delivery(store, f"89{n}")["attempts"] for n in range(3)] == [1, 0, 0]
    assert [fake_sendgrid.accepted_to(f"k{n}@example.com") for n in range(3)] == [1, 0, 0]


def test_the_mailbox_cancels_a_superseded_email_in_its_batch_and_delivers_the_one_behind(
    person_event, view, store, config, notifier_db
):
    view(person_event("310", email="old@example.com"))
    view(person_event("311", email="next@example.com"))
    # The view moved on without the event that would have cancelled it (a later version at
    # another address, as a replay after a loss leaves it): due, no longer current.
    with psycopg.connect(notifier_db, autocommit=True) as conn:
        conn.execute("UPDATE users SET version = 5, email = 'new@example.com' WHERE cpf = '310'")
    sent = store.deliver_due_to_mailbox(
        1, 300, config.email_from, composer_for(config).for_delivery
    )
    assert [d["id"] for d in sent] == [delivery(store, "311")["id"]]
    assert delivery(store, "310")["status"] == "cancelled"
    assert [m["to_email"] for m in store.mailbox(10)] == ["next@example.com"]


# -- composed as it goes out (migration 015) ------------------------------------------------------
def accepted_parts(fake_sendgrid, email: str) -> dict[str, str]:
    [message] = [
        m for m in fake_sendgrid.accepted if m["personalizations"][0]["to"][0]["email"] == email
    ]
    return {"subject": message["subject"], **{c["type"]: c["value"] for c in message["content"]}}


def due(notifier_db, *cpfs: str, later: bool = False) -> None:
    """Make the persons' deliveries due now, or in an hour (`later`)."""
    when = "now() + interval '1 hour'" if later else "now()"
    with psycopg.connect(notifier_db, autocommit=True) as conn:
        conn.execute(
            f"UPDATE deliveries SET next_attempt_at = {when} WHERE cpf = ANY(%s)", (list(cpfs),)
        )


def stored_text(notifier_db, cpf: str) -> tuple:
    with psycopg.connect(notifier_db) as conn:
        return conn.execute("SELECT html, text FROM deliveries WHERE cpf = %s", (cpf,)).fetchone()


def test_an_email_is_composed_as_it_goes_out_and_its_link_is_never_stored(
    person_event, view, store, config, fake_sendgrid, notifier_db
):
    view(person_event("40", name="Ana", email="ana40@example.com"))
    assert stored_text(notifier_db, "40") == (None, None)  # the intent alone
    with running(sender_for(store, config)):
        wait_until(lambda: delivery(store, "40")["status"] == "sent", what="the e-mail sent")
    parts = accepted_parts(fake_sendgrid, "ana40@example.com")
    assert parts["text/plain"].splitlines()[0] == "Welcome, Ana!"
    assert "http://person.test/person/40/activate?token=" in parts["text/plain"]
    assert "<h1>Welcome, Ana!</h1>" in parts["text/html"]
    assert stored_text(notifier_db, "40") == (None, None)


def test_an_email_recorded_with_its_text_before_migration_015_is_sent_as_recorded(
    person_event, view, store, config, fake_sendgrid, notifier_db
):
    for cpf in ("41", "42"):
        view(person_event(cpf, email=f"old{cpf}@example.com"))
    with psycopg.connect(notifier_db, autocommit=True) as conn:
        conn.execute(
            "UPDATE deliveries SET subject = 'Old', html = '<p>old ' || cpf || '</p>', "
            "text = 'old ' || cpf"
        )
    due(notifier_db, "42", later=True)
    with running(sender_for(store, config)):
        wait_until(lambda: delivery(store, "41")["status"] == "sent", what="the e-mail sent")
    due(notifier_db, "42")
    assert accepted_parts(fake_sendgrid, "old41@example.com") == {
        "subject": "Old",
        "text/plain": "old 41",
        "text/html": "<p>old 41</p>",
    }
    [boxed] = store.deliver_due_to_mailbox(
        1, 300, config.email_from, composer_for(config).for_delivery
    )
    [mail] = store.mailbox(1)
    assert (boxed["id"], mail["subject"], mail["text"], mail["html"]) == (
        delivery(store, "42")["id"],
        "Old",
        "old 42",
        "<p>old 42</p>",
    )


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (["deliveries SET kind = 'gone'"], "'gone'"),  # a kind no longer in the code
        (  # an event's registration time that PostgreSQL takes and psycopg cannot read
            [f"{table} SET registered_at = 'infinity'" for table in ("users", "deliveries")],
            "'infinity'",
        ),
    ],
)
def test_a_delivery_that_cannot_be_composed_fails_with_why_and_holds_back_none(
    person_event, view, store, config, fake_sendgrid, notifier_db, damage, why
):
    for cpf in ("43", "44", "45", "46"):
        view(person_event(cpf, email=f"c{cpf}@example.com"))
    with psycopg.connect(notifier_db, autocommit=True) as conn:
        for change in damage:
            conn.execute(f"UPDATE {change} WHERE cpf IN ('43', '45')")
    due(notifier_db, "45", "46", later=True)
    # the development mailbox: one batch, the other e-mail of which lands
    boxed = store.deliver_due_to_mailbox(
        10, 300, config.email_from, composer_for(config).for_delivery
    )
    assert [d["id"] for d in boxed] == [delivery(store, "44")["id"]]
    assert [m["to_email"] for m in store.mailbox(10)] == ["c44@example.com"]
    # SendGrid: the sender goes on to the next
    due(notifier_db, "45", "46")
    with running(sender_for(store, config)):
        wait_until(lambda: delivery(store, "46")["status"] == "sent", what="the next one sent")
        wait_until(lambda: delivery(store, "45")["status"] == "failed", what="the bad one failed")
    for cpf in ("43", "45"):
        failed = delivery(store, cpf)
        assert failed["status"] == "failed"
        assert "could not compose the e-mail" in failed["last_error"]
        assert why in failed["last_error"]
        assert (failed["sent_at"], failed["provider"]) == (None, None)
    assert fake_sendgrid.accepted_to("c45@example.com") == 0


# -- the linger (SENDER_LINGER_SECONDS) ------------------------------------------------------------
class CountingStore(NotifierStore):
    """The store, recording the size of each mailbox batch and each look at what falls due."""

    def __init__(self, pool) -> None:
        super().__init__(pool)
        self.batches: list[int] = []
        self.looks = 0

    def deliver_due_to_mailbox(self, *args, **kwargs) -> list[dict]:
        delivered = super().deliver_due_to_mailbox(*args, **kwargs)
        self.batches.append(len(delivered))
        return delivered

    def next_due_in(self) -> float | None:
        self.looks += 1
        return super().next_due_in()


def listening(notifier_db) -> bool:
    with psycopg.connect(notifier_db) as conn:
        return (
            conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query = 'LISTEN deliveries'"
            ).fetchone()[0]
            > 0
        )


def test_an_idle_sender_woken_by_a_delivery_lingers_and_sends_a_burst_in_one_statement(
    person_event, view, store, config, notifier_db
):
    # Only a recorded delivery wakes it (no poll comes before the end of the test); the three
    # deliveries are recorded one commit each, each notifying, well within the second.
    config = config.model_copy(
        update={"sendgrid_api_key": None, "sender_linger_seconds": 1.0, "sender_poll_seconds": 60}
    )
    counting = CountingStore(store.pool)
    with running(Sender(counting, config, None)):
        wait_until(lambda: counting.looks >= 1 and listening(notifier_db), what="an idle sender")
        for n in range(3):
            view(person_event(f"50{n}", email=f"burst{n}@example.com"))
        wait_until(lambda: len(store.mailbox(10)) == 3, what="the three e-mails in the mailbox")
    assert [size for size in counting.batches if size] == [3]


def test_the_sender_linger_is_between_0_and_1_second():
    from notifier.config import NotifierConfig
    from pydantic import ValidationError

    assert NotifierConfig(sender_linger_seconds=0).sender_linger_seconds == 0
    for wrong in (-0.01, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValidationError, match="sender_linger_seconds"):
            NotifierConfig(sender_linger_seconds=wrong)
