"""The notifier consumer's handler: the user view and the e-mail intents it records."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from itsdangerous import URLSafeTimedSerializer
from messaging import Envelope
from notifier.email import TOKEN_SALT

pytestmark = pytest.mark.integration

REGISTERED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).isoformat()


@pytest.fixture
def person(person_event):
    """person_event with this module's defaults: an update, of the registration REGISTERED."""

    def build(cpf: str, version: int, change: str = "updated", **fields) -> Envelope:
        fields.setdefault("created_at", REGISTERED)
        return person_event(cpf, version, change, **fields)

    return build


def deliveries(store, cpf: str) -> list[dict]:
    return [d for d in store.deliveries(None, 500) if d["cpf"] == cpf]


def test_the_same_person_created_three_times_records_one_welcome(person, view, store):
    created = person("1", 1, "created")
    for _ in range(3):
        view(created)
    found = deliveries(store, "1")
    assert [(d["kind"], d["to_email"], d["status"]) for d in found] == [
        ("welcome", "ana@example.com", "pending")
    ]


def test_the_welcome_carries_a_signed_link_for_this_person_and_address(person, view, composed):
    view(person("2", 1, "created"))
    [(kind, mail)] = composed("2").items()
    html, text = mail.html, mail.text
    assert kind == "welcome"
    link = next(w for w in text.split() if w.startswith("http"))
    assert link.startswith("http://person.test/person/2/activate?token=")
    assert link.replace("&", "&amp;") in html and "Ana" in html
    token = link.split("token=")[1]
    payload = URLSafeTimedSerializer("test-secret", salt=TOKEN_SALT).loads(token, max_age=60)
    assert payload == {"cpf": "2", "email": "ana@example.com", "registered_at": REGISTERED}


def test_an_email_added_later_triggers_the_welcome_once(person, view, store):
    view(person("3", 1, "created", email=None))
    assert deliveries(store, "3") == []
    view(person("3", 2, email="first@example.com"))
    view(person("3", 3, email="second@example.com"))
    assert [d["to_email"] for d in deliveries(store, "3")] == ["first@example.com"]


def test_reordered_events_still_record_one_welcome(person, view, store):
    view(person("4", 2, email="ana@example.com"))
    view(person("4", 1, "created", email=None))
    assert len(deliveries(store, "4")) == 1
    assert store.user("4")["version"] == 2


def test_a_new_registration_after_deletion_gets_its_own_welcome(person, view, store):
    view(person("5", 1, "created"))
    view(person("5", 2, "deleted"))
    assert store.user("5") is None
    later = (datetime.fromisoformat(REGISTERED) + timedelta(days=1)).isoformat()
    view(person("5", 3, "created", created_at=later))
    assert [d["kind"] for d in deliveries(store, "5")] == ["welcome", "welcome"]


def test_a_late_event_does_not_resurrect_a_deleted_user(person, view, store):
    view(person("6", 1, "created"))
    view(person("6", 3, "deleted"))
    view(person("6", 2))
    assert store.user("6") is None


def test_activation_requested_records_a_fresh_link_once_per_request(person, view, store):
    view(person("7", 1, "created"))
    request = person("7", 2, "activation_requested")
    view(request)
    view(request)
    view(person("7", 3, "activation_requested"))
    assert [d["kind"] for d in deliveries(store, "7")] == ["activation", "activation", "welcome"]


def test_a_late_activation_request_mails_no_one_after_an_email_change(person, view, store):
    view(person("71", 1, "created", email="old@example.com"))
    late = person("71", 2, "activation_requested", email="old@example.com")
    view(person("71", 3, email="new@example.com"))
    view(late)
    assert [(d["kind"], d["to_email"]) for d in deliveries(store, "71")] == [
        ("welcome", "old@example.com")
    ]


def test_a_late_activation_request_of_a_deleted_registration_mails_no_one(person, view, store):
    view(person("72", 1, "created"))
    late = person("72", 2, "activation_requested")
    view(person("72", 3, "deleted"))
    later = (datetime.fromisoformat(REGISTERED) + timedelta(days=1)).isoformat()
    view(person("72", 4, "created", created_at=later))
    view(late)
    kinds = [(d["kind"], d["status"]) for d in deliveries(store, "72")]
    assert sorted(kinds) == [("welcome", "cancelled"), ("welcome", "pending")]


def test_a_deletion_cancels_the_pending_emails_of_the_person(person, view, store):
    view(person("73", 1, "created"))
    view(person("73", 2, "activation_requested"))
    view(person("73", 3, "deleted"))
    assert {(d["kind"], d["status"]) for d in deliveries(store, "73")} == {
        ("welcome", "cancelled"),
        ("activation", "cancelled"),
    }
    assert store.claim_due(10, 300) == []


def test_a_late_deletion_cancels_nothing(person, view, store):
    view(person("74", 1, "created"))
    view(person("74", 3, email="ana@example.com"))
    view(person("74", 2, "deleted"))  # older than what the view holds: not applied
    assert [d["status"] for d in deliveries(store, "74")] == ["pending"]


def test_a_new_address_cancels_what_was_queued_to_the_old_one(person, view, store):
    view(person("75", 1, "created", email="a@x.example"))
    view(person("75", 2, "activation_requested", email="a@x.example"))
    view(person("75", 3, "activation_requested", email="b@x.example", status="pending"))
    found = {(d["kind"], d["to_email"], d["status"]) for d in deliveries(store, "75")}
    assert found == {
        ("welcome", "a@x.example", "cancelled"),
        ("activation", "a@x.example", "cancelled"),
        ("activation", "b@x.example", "pending"),
    }
    assert [d["to_email"] for d in store.claim_due(10, 300)] == ["b@x.example"]


def test_a_first_address_gets_one_email_the_welcome_with_its_link(person, view, store):
    view(person("76", 1, "created", email=None))
    view(person("76", 2, "activation_requested", email="b@x.example"))
    assert [(d["kind"], d["to_email"]) for d in deliveries(store, "76")] == [
        ("welcome", "b@x.example")
    ]


def lose(store, cpf: str) -> None:
    """The view's row deleted behind its back (a restore, a failover, a hand)."""
    with store.pool.connection() as conn:
        conn.execute("DELETE FROM users WHERE cpf = %s", (cpf,))


def test_a_view_that_lost_a_row_holds_its_emails_until_repaired_and_cancels_none(
    person, view, store
):
    """A lost row and then an older event of an earlier registration applied (a late or
    redelivered one): the current registration's welcome is neither cancelled (the view is
    behind it) nor sent (it is not current there), until verification brings the row back."""
    view(person("77", 1, "created"))
    view(person("77", 2, "deleted"))
    later = (datetime.fromisoformat(REGISTERED) + timedelta(days=1)).isoformat()
    current = person("77", 3, "created", created_at=later)
    view(current)
    lose(store, "77")
    assert store.claim_due(10, 300) == []
    view(person("77", 1, "created"))  # the earlier registration, late
    assert store.claim_due(10, 300) == []
    view(current)  # the repair's replay: the latest event
    [claimed] = store.claim_due(10, 300)
    assert claimed["kind"] == "welcome"
    assert [d["status"] for d in deliveries(store, "77")] == ["sending", "cancelled"]


def test_status_changes_update_the_view(person, view, store):
    view(person("8", 1, "created"))
    view(person("8", 2, status="active"))
    assert store.user("8")["status"] == "active"


def test_item_events_are_ignored_and_bad_person_data_is_dead_lettered(person, bus, store, queue):
    bus.publish(
        Envelope.new(
            event_type="income.created",
            entity_id="i",
            entity_version=1,
            data={"cpf": "9", "value": "1"},
            producer="person",
        )
    )
    bus.publish(
        Envelope.new(
            event_type="person.created",
            entity_id="9",
            entity_version=1,
            data={"cpf": "9"},
            producer="person",
        )
    )
    bus.publish(person("10", 1, "created"))
    bus.run_until_idle()
    dead = bus.dead_letters(queue)
    assert [m.headers["x-exception-type"] for m in dead] == ["PermanentError"]
    assert "name" in dead[0].headers["x-dead-reason"]
    assert store.user("10") is not None
    assert bus.stats(queue).ignored == 1


@pytest.mark.parametrize(
    "created_at",
    ["infinity", "2026-01-02", "2026-01-02T03:04:05", "soon", "0001-01-01T00:00:00+05:00"],
)
def test_a_registration_time_no_link_can_carry_is_dead_lettered_with_why(
    person, bus, store, queue, created_at
):
    bus.publish(person("20", 1, "created", created_at=created_at))
    bus.publish(person("21", 1, "created"))
    bus.run_until_idle(max_batch=2)
    [dead] = bus.dead_letters(queue)
    assert dead.headers["x-exception-type"] == "PermanentError"
    assert "created_at" in dead.headers["x-dead-reason"]
    assert store.user("20") is None and store.user("21") is not None


def test_a_user_whose_registration_time_is_infinite_is_still_answered(person, view, store):
    view(person("22", 1, "created"))  # as a view written before created_at was checked
    with store.pool.connection() as conn:
        conn.execute("UPDATE users SET registered_at = 'infinity' WHERE cpf = '22'")
    user = store.user("22")
    assert (user["name"], user["registered_at"], user["welcome"]) == ("Ana", "infinity", None)


def test_a_batch_applies_its_events_in_order_in_one_transaction(person, bus, store):
    for message in (
        person("11", 1, "created"),
        person("11", 2, "activation_requested"),
        person("12", 1, "created"),
        person("12", 2, "deleted"),
        person("13", 1, "created", email=None),
        person("13", 2, email="late@example.com", status="active"),
    ):
        bus.publish(message)
    bus.run_until_idle(max_batch=6)
    assert [d["kind"] for d in deliveries(store, "11")] == ["activation", "welcome"]
    assert store.user("12") is None and len(deliveries(store, "12")) == 1
    assert store.user("13")["status"] == "active"
    assert [d["to_email"] for d in deliveries(store, "13")] == ["late@example.com"]


def test_a_bad_event_is_dead_lettered_alone_and_its_batch_mates_applied(person, bus, store, queue):
    bad = Envelope.new(
        event_type="person.created",
        entity_id="15",
        entity_version=1,
        data={"cpf": "15", "name": 15},
        producer="person",
    )
    bus.publish(person("14", 1, "created"))
    bus.publish(bad)
    bus.publish(person("16", 1, "created"))
    bus.run_until_idle(max_batch=3)
    assert [m.message_id for m in bus.dead_letters(queue)] == [str(bad.event_id)]
    assert store.user("14") is not None and store.user("16") is not None


def test_an_event_the_database_refuses_rolls_its_batch_back_and_is_dead_lettered_alone(
    person, bus, store, queue
):
    refused = person("18", 1, "created", name="Ana\x00")  # text cannot hold NUL
    for message in (person("17", 1, "created"), refused, person("19", 1, "created")):
        bus.publish(message)
    bus.run_until_idle(max_batch=3)
    assert [m.message_id for m in bus.dead_letters(queue)] == [str(refused.event_id)]
    assert store.user("17") is not None and store.user("19") is not None
    assert store.user("18") is None


def test_the_database_away_longer_than_the_retry_ladder_dead_letters_nothing(
    notifier_db, broker, config, person_event
):
    from urllib.parse import urlsplit

    from messaging.testing import running, wait_until
    from notifier.consumer import build
    from psycopg_pool import ConnectionPool
    from tcp_proxy import TcpProxy

    target = urlsplit(notifier_db)
    proxy = TcpProxy(target.hostname, target.port or 5432)
    settings = config.model_copy(
        update={"events_exchange": broker.exchange, "retry_delays": (0.2, 0.4)}
    )
    with ConnectionPool(proxy.url(notifier_db), min_size=1, max_size=3, timeout=2) as pool:
        consumer, _ = build(settings, pool)
        topology = consumer.topology
        broker.topologies.append(topology)
        try:
            with running(consumer):
                wait_until(consumer.attached.is_set, what="attached")
                broker.publish(*[person_event(f"9{n:03d}") for n in range(50)])
                wait_until(lambda: consumer.stats.consumed >= 50, what="the first fifty")
                proxy.cut()
                broker.publish(*[person_event(f"8{n:03d}") for n in range(50)])
                wait_until(consumer.paused.is_set, timeout=30, what="the consumer paused")
                ladder = time.monotonic() + 3 * sum(topology.retry_delays)
                wait_until(lambda: time.monotonic() > ladder, what="longer than the retry ladder")
                proxy.restore()
                wait_until(lambda: consumer.stats.consumed >= 100, timeout=60, what="the rest")
        finally:
            proxy.close()
    assert broker.depth(topology.dead_queue) == 0
    assert consumer.stats.dead_lettered == 0
    with psycopg.connect(notifier_db) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 100


def test_past_the_days_cap_e_mails_to_one_address_are_suppressed(person, store, config):
    from notifier.consumer import UserView
    from notifier.store import NotifierStore

    capped = UserView(NotifierStore(store.pool, emails_per_address_per_day=2))
    for cpf in ("81", "82", "83"):  # three registrations with the same address
        capped(person(cpf, 1, "created", email="target@example.com"))
    statuses = [d["status"] for d in sorted(store.deliveries(None, 10), key=lambda d: d["id"])]
    assert statuses == ["pending", "pending", "suppressed"]
    assert store.claim_due(10, 300)[-1]["cpf"] == "82"


def test_a_crafted_name_cannot_add_lines_to_the_email(person, view, composed):
    view(person("84", 1, "created", name="Ana\n\nMaria\r\n\u2028Silva"))
    first_line = composed("84")["welcome"].text.splitlines()[0]
    assert first_line == "Welcome, Ana Maria Silva!"  # links are left out: test_email_channel.py


def test_a_read_only_database_for_longer_than_the_retry_ladder_dead_letters_nothing(
    notifier_db, broker, config, person_event, administrator
):
    """The database answers but refuses writes (a standby, default_transaction_read_only): an
    outage, not the events' fault. The consumer is built as its process builds it."""
    from messaging.testing import running, wait_until
    from notifier.consumer import build
    from psycopg_pool import ConnectionPool

    settings = config.model_copy(
        update={"events_exchange": broker.exchange, "retry_delays": (0.2, 0.4)}
    )
    name = psycopg.conninfo.conninfo_to_dict(notifier_db)["dbname"]

    def read_only(on: bool) -> None:
        admin_db = psycopg.conninfo.make_conninfo(administrator(notifier_db), dbname="postgres")
        with psycopg.connect(admin_db, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {on}')
            admin.execute(  # the pool's sessions start again with the new default
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )

    with ConnectionPool(notifier_db, min_size=1, max_size=3, timeout=2) as pool:
        consumer, _ = build(settings, pool)
        broker.topologies.append(consumer.topology)
        try:
            with running(consumer):
                wait_until(consumer.attached.is_set, what="attached")
                broker.publish(*[person_event(f"7{n:03d}") for n in range(30)])
                wait_until(lambda: consumer.stats.consumed >= 30, what="the first thirty")
                read_only(True)
                broker.publish(*[person_event(f"6{n:03d}") for n in range(30)])
                wait_until(
                    lambda: "read-only" in (consumer.health() or ""), what="paused, saying why"
                )
                over = time.monotonic() + 5 * sum(consumer.topology.retry_delays)
                wait_until(lambda: time.monotonic() > over, what="longer than the retry ladder")
                assert broker.depth(consumer.topology.dead_queue) == 0
                read_only(False)
                wait_until(lambda: consumer.stats.consumed >= 60, timeout=60, what="the rest")
        finally:
            read_only(False)
    assert broker.depth(consumer.topology.dead_queue) == 0
    with psycopg.connect(notifier_db) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 60


def test_a_database_whose_name_does_not_resolve_is_an_outage_not_the_events_fault(
    broker, config, person_event
):
    from messaging.testing import running, wait_until
    from notifier.consumer import build
    from psycopg_pool import ConnectionPool

    settings = config.model_copy(
        update={"events_exchange": broker.exchange, "retry_delays": (0.2, 0.4)}
    )
    gone = "postgresql://postgres@db-gone.invalid:5432/notifier"  # .invalid never resolves
    with ConnectionPool(gone, min_size=0, max_size=3, timeout=1, open=True) as pool:
        consumer, _ = build(settings, pool)
        broker.topologies.append(consumer.topology)
        with running(consumer):
            wait_until(consumer.attached.is_set, what="attached")
            broker.publish(*[person_event(f"5{n:03d}") for n in range(10)])
            wait_until(consumer.paused.is_set, timeout=30, what="paused")
            over = time.monotonic() + 3 * sum(settings.retry_delays)
            wait_until(lambda: time.monotonic() > over, what="longer than the retry ladder")
    assert broker.depth(consumer.topology.dead_queue) == 0 and consumer.stats.retried == 0
