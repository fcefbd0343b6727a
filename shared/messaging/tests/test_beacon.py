"""The attached beacon: beats only while the consumer is attached, at once when it attaches."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from messaging.replicas import AttachedBeacon
from messaging.testing import wait_until

pytestmark = pytest.mark.unit


def test_beats_as_soon_as_attached_and_survives_a_failing_beat():
    consumer = SimpleNamespace(attached=threading.Event())
    beats: list[float] = []

    def beat() -> None:
        beats.append(time.monotonic())
        if len(beats) == 1:
            raise ConnectionError("store down for one beat")

    beacon = AttachedBeacon(consumer, beat, every=0.05)
    beacon.start()
    try:
        assert not consumer.attached.wait(0.2) and beats == []
        consumer.attached.set()
        wait_until(lambda: len(beats) >= 3, what="beats after a failed one")
    finally:
        beacon.stop()


def test_a_long_interval_does_not_delay_the_first_beat():
    consumer = SimpleNamespace(attached=threading.Event())
    first = threading.Event()
    beacon = AttachedBeacon(consumer, first.set, every=3600)
    beacon.start()
    try:
        consumer.attached.set()
        wait_until(first.is_set, what="the first beat")
    finally:
        beacon.stop()
