"""The production e-mail path: SendGrid over TLS with the CA of SENDGRID_CA_FILE, connections kept
alive, against the fake SendGrid over TLS (a CA made for the run) and the real PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from messaging.testing import running, wait_until
from notifier.email import tls_context
from notifier.sender import Sender, transport_for
from stack.fake_sendgrid import FakeSendGrid
from stack.tls_ca import LocalCA

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ca(tmp_path_factory) -> LocalCA:
    return LocalCA.make(tmp_path_factory.mktemp("ca"), name="notifier test CA")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> LocalCA:
    return LocalCA.make(tmp_path_factory.mktemp("other-ca"), name="a CA nobody configured")


@pytest.fixture
def tls_sendgrid(local_ca) -> Iterator[FakeSendGrid]:
    fake = FakeSendGrid(tls=local_ca.server_context()).start()
    yield fake
    fake.stop()


@pytest.fixture
def tls_config(config, tls_sendgrid, local_ca):
    return config.model_copy(
        update={"sendgrid_host": tls_sendgrid.url, "sendgrid_ca_file": str(local_ca.ca_file)}
    )


def delivery(store, cpf: str) -> dict:
    return next(d for d in store.deliveries(None, 500) if d["cpf"] == cpf)


def record(view, person_event, cpfs) -> None:
    for cpf in cpfs:
        view(person_event(cpf, name=f"P{cpf}", email=f"{cpf}@example.com"))


def all_sent(store, cpfs) -> bool:
    sent = {d["cpf"] for d in store.deliveries("sent", 500)}
    return set(cpfs) <= sent


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_one_worker_sends_every_email_over_one_kept_alive_connection(
    person_event, view, store, config, tls_config, fake_sendgrid, tls_sendgrid, scheme
):
    fake = tls_sendgrid if scheme == "https" else fake_sendgrid
    config = tls_config if scheme == "https" else config
    cpfs = [f"40{n}" for n in range(6)]
    record(view, person_event, cpfs)
    config = config.model_copy(update={"sender_concurrency": 1})
    with running(Sender(store, config, transport_for(config))):
        wait_until(lambda: all_sent(store, cpfs), what="six e-mails sent")
    assert len(fake.accepted) == 6
    assert fake.connections == 1
    assert fake.handshakes == (1 if scheme == "https" else 0)


def test_each_worker_keeps_at_most_one_connection(
    person_event, view, store, tls_config, tls_sendgrid
):
    config = tls_config.model_copy(update={"sender_concurrency": 4})
    cpfs = [f"41{n:02d}" for n in range(40)]
    record(view, person_event, cpfs)
    with running(Sender(store, config, transport_for(config))):
        wait_until(lambda: all_sent(store, cpfs), timeout=30, what="forty e-mails sent")
    assert len(tls_sendgrid.accepted) == 40
    assert 1 <= tls_sendgrid.connections <= 4
    assert tls_sendgrid.handshakes == tls_sendgrid.connections


@pytest.mark.parametrize("trusted", ["another CA", "the system's CAs"])
def test_a_sendgrid_whose_certificate_no_configured_ca_signed_is_refused(
    person_event, view, store, tls_config, tls_sendgrid, other_ca, trusted
):
    ca_file = str(other_ca.ca_file) if trusted == "another CA" else None
    config = tls_config.model_copy(update={"sendgrid_ca_file": ca_file})
    record(view, person_event, ["42"])
    with running(Sender(store, config, transport_for(config))):
        wait_until(lambda: delivery(store, "42")["attempts"] >= 1, what="a refused attempt")
    refused = delivery(store, "42")
    assert refused["status"] == "pending" and refused["next_attempt_at"] is not None
    assert "CERTIFICATE_VERIFY_FAILED" in refused["last_error"]
    assert (tls_sendgrid.requests, tls_sendgrid.handshakes, tls_sendgrid.accepted) == (0, 0, [])


# What each answer of SendGrid comes to, over TLS, and whether the connection survives it: an
# answer read to its end leaves it for the next e-mail; a timeout or a broken answer closes it.
ANSWERS = [
    ("202", "sent", "HTTP 202", True),
    ("429", "retry", "HTTP 429", True),
    ("500", "retry", "HTTP 500", True),
    ("400", "failed", "does not match a verified Sender", True),
    ("hang", "retry", "timed out", False),
    ("incomplete", "retry", "IncompleteRead", False),
    ("garbage", "retry", "BadStatusLine", False),
    ("disconnect", "retry", "RemoteDisconnected", False),
]


@pytest.mark.parametrize(("answer", "status", "detail", "kept"), ANSWERS)
def test_each_answer_over_tls_is_classified_and_the_next_email_goes_out(
    tls_config, tls_sendgrid, caplog, answer, status, detail, kept
):
    caplog.set_level(logging.DEBUG)
    transport = transport_for(tls_config)
    tls_sendgrid.then(answer)
    mail = {"id": 7, "to_email": "t@example.com", "subject": "S", "text": "T", "html": "<p>H</p>"}
    outcome = transport.send(mail)
    assert (outcome.status, detail in outcome.detail) == (status, True), outcome
    if answer == "429":
        assert outcome.retry_after is not None and outcome.retry_after <= 2
    then = transport.send(mail)
    assert then.status == "sent" and then.message_id
    assert tls_sendgrid.connections == (1 if kept else 2)
    assert tls_sendgrid.authorizations[-1] == f"Bearer {tls_config.sendgrid_api_key}"
    assert tls_config.sendgrid_api_key not in caplog.text


def test_the_tls_context_is_made_once_per_process_and_ca_file(local_ca, other_ca):
    assert tls_context(str(local_ca.ca_file)) is tls_context(str(local_ca.ca_file))
    assert tls_context(str(other_ca.ca_file)) is not tls_context(str(local_ca.ca_file))
    assert tls_context(None) is tls_context("")  # unset or blank: the system's CAs


def test_a_ca_file_that_cannot_be_read_stops_the_sender_at_start(tls_config, tmp_path):
    missing = tls_config.model_copy(update={"sendgrid_ca_file": str(tmp_path / "none.pem")})
    with pytest.raises(ValueError, match="SENDGRID_CA_FILE"):
        transport_for(missing)
