"""The benchmark's own bookkeeping (bench/): what it names each figure, how it finds the relay's
first publish, which e-mails it counts. No server: the measurements themselves run in
`make bench`."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pika.channel
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import peer_bench
import relay_bench
import stack_bench

pytestmark = pytest.mark.unit


def test_the_relay_clock_sees_the_first_publish_and_puts_pikas_method_back(monkeypatch):
    calls = []
    monkeypatch.setattr(
        pika.channel.Channel, "basic_publish", lambda self, *a, **k: calls.append((self, a))
    )
    original = pika.channel.Channel.basic_publish
    with relay_bench.first_publish_clock() as first:
        assert first == []
        pika.channel.Channel.basic_publish("channel", "exchange", "", b"one")
        assert len(first) == 1
        assert pika.channel.Channel.basic_publish is original  # unwrapped after the first
        pika.channel.Channel.basic_publish("channel", "exchange", "", b"two")
    assert len(first) == 1
    assert [a[2] for _self, a in calls] == [b"one", b"two"]
    assert pika.channel.Channel.basic_publish is original


def test_the_relay_clock_unwraps_even_without_a_publish(monkeypatch):
    monkeypatch.setattr(pika.channel.Channel, "basic_publish", lambda self, *a, **k: None)
    original = pika.channel.Channel.basic_publish
    with relay_bench.first_publish_clock() as first:
        assert pika.channel.Channel.basic_publish is not original
    assert first == []
    assert pika.channel.Channel.basic_publish is original


def measured() -> dict[str, float]:
    return {
        "cpu_ms_per_registration": 6.0,
        "cpu_ms_per_registration_person": 2.0,
        "post_person_p50_ms": 5.0,
        "post_person_p99_ms": 20.0,
    }


def test_each_point_of_the_cost_curve_is_named_for_its_rate():
    assert stack_bench.cost_figures(measured(), 50.0) == {
        "cpu_ms_per_registration_at_50": 6.0,
        "post_person_p50_ms_at_50": 5.0,
        "post_person_p99_ms_at_50": 20.0,
    }
    at_100 = stack_bench.cost_figures(measured(), 100.0)
    assert at_100["cpu_ms_per_registration"] == 6.0  # the unsuffixed figure is the 100/s one
    assert at_100["cpu_ms_per_registration_person"] == 2.0
    assert "post_person_p99_ms" not in at_100
    at_200 = stack_bench.cost_figures(measured(), 200.0)
    assert at_200["post_person_p99_ms"] == 20.0  # the unsuffixed POST latency is at 200/s
    assert "cpu_ms_per_registration" not in at_200


def test_the_stack_steps_expect_the_names_they_print():
    printed = set()
    for rate in stack_bench.COST_RATES:
        printed |= set(stack_bench.cost_figures(measured(), rate))
    assert set(stack_bench.NAMES["cost"]) <= printed
    latency = {"latency_score_p99_ms": 1.0, "latency_notifier_p99_ms": 2.0}
    assert stack_bench.at_rate(latency, 150.0) == {
        "latency_score_p99_ms_at_150": 1.0,
        "latency_notifier_p99_ms_at_150": 2.0,
    }
    assert "latency_notifier_p99_ms_at_150" in stack_bench.NAMES["latency"]
    assert "latency_notifier_p99_ms" in stack_bench.NAMES["latency"]


def test_figures_at_a_rate_keep_their_units_decimals(capsys):
    stack_bench.show("post_person_p99_ms_at_150", 12.345)
    stack_bench.show("latency_writes_s_at_150", 149.6)
    stack_bench.show("cpu_ms_per_registration_at_50", 7.891)
    assert capsys.readouterr().out.splitlines() == [
        "post_person_p99_ms_at_150: 12.3",
        "latency_writes_s_at_150: 150",
        "cpu_ms_per_registration_at_50: 7.89",
    ]


class FakeMailbox:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: list[dict] = []

    def add(self, address: str) -> None:
        self.accepted.append({"personalizations": [{"to": [{"email": address}]}]})


def test_the_peer_counts_only_the_e_mails_of_its_registrations():
    fake = FakeMailbox()
    fake.add("p8100000001@bench.example")  # the warm-up's, late
    mails = peer_bench.Mails(fake, "811")
    fake.add("p8110000001@bench.example")
    assert mails.count() == 1
    fake.add("p8100000002@bench.example")
    fake.add("p8110000002@bench.example")
    assert mails.count() == 2
    assert mails.count() == 2  # each e-mail read once
    assert mails.addresses == ["p8110000001@bench.example", "p8110000002@bench.example"]
