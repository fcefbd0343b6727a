"""Unit: the window of unconfirmed messages the relay and the confirmed publisher share."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from messaging.confirms import ConfirmWindow
from pika.spec import Basic

pytestmark = pytest.mark.unit


def ack(tag: int, multiple: bool = False) -> Basic.Ack:
    return Basic.Ack(delivery_tag=tag, multiple=multiple)


def test_tags_count_from_one_in_publish_order_and_a_multiple_ack_takes_the_prefix():
    window: ConfirmWindow[str] = ConfirmWindow()
    assert [window.published(x) for x in "abcd"] == [1, 2, 3, 4]
    assert window.confirmed(ack(3, multiple=True)) == (True, ["a", "b", "c"])
    assert len(window) == 1
    assert window.confirmed(ack(4)) == (True, ["d"])
    assert not window


def test_a_nack_says_so_and_a_tag_settled_twice_confirms_nothing_again():
    window: ConfirmWindow[int] = ConfirmWindow()
    window.published(10)
    window.published(20)
    assert window.confirmed(Basic.Nack(delivery_tag=2, multiple=False)) == (False, [20])
    assert window.confirmed(ack(2)) == (True, [])
    assert window.confirmed(SimpleNamespace(delivery_tag=5, multiple=True)) == (False, [10])
