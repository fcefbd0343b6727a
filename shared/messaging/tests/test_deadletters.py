"""Dead queues of thousands of messages against the real RabbitMQ: looked at, searched, replayed
and discarded a bounded window at a time, with counts that say what happened."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pika
import pytest
from messaging.cli import main
from messaging.connection import connect
from messaging.deadletters import RUN_HEADER, DeadLetters
from messaging.publisher import ConfirmedPublisher, Outgoing
from messaging.topology import Topology

pytestmark = pytest.mark.integration

MANY, WINDOW = 3000, 200


def declared(broker, service: str = "dlq") -> Topology:
    topology = broker.topology(service)
    conn = connect(broker.amqp_url, "test-declare")
    try:
        topology.declare(conn)
    finally:
        conn.close()
    return topology


def dead_letter(n: int, **headers: str) -> Outgoing:
    """The n-th of a dead queue's messages, as the consumer runtime dead-letters one."""
    return Outgoing(
        "",
        json.dumps({"n": n, "cpf": f"{n:011d}"}).encode(),
        pika.BasicProperties(
            message_id=f"m-{n}",
            type="thing.updated",
            delivery_mode=2,
            headers={
                "x-exception-type": "PermanentError",
                "x-dead-reason": f"PermanentError: cannot take kind {n % 3}",
                "x-dead-at": f"2026-12-07T10:00:{n % 60:02d}+00:00",
                "x-attempts": 1,
                **headers,
            },
        ),
    )


def fill(broker, topology: Topology, count: int) -> None:
    messages = (dead_letter(n) for n in range(count))
    publisher = ConfirmedPublisher(broker.amqp_url, "", "test-fill")
    publisher.publish_all(Outgoing(topology.dead_queue, m.body, m.properties) for m in messages)


@dataclass
class Watch:
    lowest: int | None = None
    looks: int = 0


@contextmanager
def lowest_depth(broker, queue: str) -> Iterator[Watch]:
    """Watch, from a connection of its own, the fewest messages the queue had ready (the rest
    were held unacknowledged by a reader) for the length of the with-block."""
    watch, done = Watch(), threading.Event()

    def poll() -> None:
        conn = connect(broker.amqp_url, "test-watch")
        try:
            channel = conn.channel()
            while not done.is_set():
                ready = channel.queue_declare(queue, passive=True).method.message_count
                watch.lowest = ready if watch.lowest is None else min(watch.lowest, ready)
                watch.looks += 1
        finally:
            conn.close()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        done.set()
        thread.join(10)


def test_a_look_at_thousands_of_dead_letters_holds_at_most_its_window_and_takes_none(broker):
    topology = declared(broker)
    fill(broker, topology, MANY)
    dead = DeadLetters(broker.amqp_url, topology.queue, window=WINDOW)
    looks, settled = [], []
    with lowest_depth(broker, topology.dead_queue) as watch:
        for _ in range(5):
            looks.append(dead.look())
            # A look's unacknowledged window goes back to the queue when its channel closes,
            # which the broker finishes after the look returns: the next look, and the count,
            # wait for it (a loaded run's next look began with 2,832 of 3,000 ready).
            settled.append(settled_depth(broker, topology.dead_queue, MANY))
    assert watch.looks > 0 and watch.lowest >= MANY - WINDOW
    assert settled == [MANY] * 5  # each look took none
    for look in looks:
        assert (len(look.letters), look.depth, look.partial) == (WINDOW, MANY, True)
        assert all(letter.body is None for letter in look.letters)  # grouped from headers
    assert {letter.group for letter in looks[0].letters} == {
        "PermanentError: PermanentError: cannot take kind …"
    }


def test_a_look_keeps_only_the_bodies_asked_for(broker):
    topology = declared(broker)
    fill(broker, topology, 10)
    look = DeadLetters(broker.amqp_url, topology.queue).look(
        keep_body=lambda letter, body: b'"n": 3,' in body
    )
    assert not look.partial
    kept = [letter for letter in look.letters if letter.body is not None]
    assert [letter.id for letter in kept] == ["m-3"]
    assert json.loads(kept[0].body)["n"] == 3


def settled_depth(broker, queue: str, expected: int, patience: float = 15.0) -> int:
    """The queue's depth once it is `expected`, or the last seen after `patience` seconds."""
    deadline = time.monotonic() + patience
    while (depth := broker.depth(queue)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the broker's count: nothing to be notified of
    return depth


def test_chosen_ids_beyond_the_first_window_are_replayed_holding_at_most_the_window(broker):
    topology = declared(broker)
    fill(broker, topology, MANY)
    chosen = ["m-5", "m-1500", f"m-{MANY - 1}"]
    dead = DeadLetters(broker.amqp_url, topology.queue, window=WINDOW)
    with lowest_depth(broker, topology.dead_queue) as watch:
        outcome = dead.replay([*chosen, "nope"])
    assert watch.lowest >= MANY - WINDOW - len(chosen)  # held, or replayed and gone
    assert (outcome.done, outcome.missing, outcome.depth) == (3, ["nope"], MANY)
    assert outcome.scanned == MANY  # it looked at each once, then stopped
    # A quorum queue takes back what a closed reader held a moment later: the count read at
    # the end may miss up to a window of them, never more, and the queue does get them all.
    assert MANY - 3 - WINDOW <= outcome.remaining <= MANY - 3
    assert settled_depth(broker, topology.dead_queue, MANY - 3) == MANY - 3
    replayed = drained(broker, topology.queue)
    assert sorted(props.message_id for props, _ in replayed) == sorted(chosen)
    for props, _ in replayed:
        assert "x-dead-reason" not in props.headers and "x-attempts" not in props.headers
        assert "x-replayed-at" in props.headers and RUN_HEADER in props.headers
    # Every other dead letter is still there, once, with its failure headers.
    left = DeadLetters(broker.amqp_url, topology.queue, window=MANY).look()
    assert len({letter.id for letter in left.letters}) == MANY - 3
    assert all(letter.reason.startswith("PermanentError") for letter in left.letters)


def test_a_search_for_ids_that_are_all_found_stops_there(broker):
    topology = declared(broker)
    fill(broker, topology, 1000)
    outcome = DeadLetters(broker.amqp_url, topology.queue, window=100).discard(["m-150"])
    assert (outcome.done, outcome.missing) == (1, [])
    assert outcome.scanned == 200  # two slices, not the whole queue
    assert broker.depth(topology.dead_queue) == 999


def test_a_replay_of_all_while_others_look_reports_honest_counts(broker, monkeypatch, capsys):
    monkeypatch.setenv("AMQP_URL", broker.amqp_url)
    topology = declared(broker)
    fill(broker, topology, MANY)
    stop, looks = threading.Event(), []

    def look_again_and_again() -> None:  # an operator's console, refreshing the page
        dead = DeadLetters(broker.amqp_url, topology.queue, window=WINDOW)
        while not stop.is_set():
            looks.append(dead.look())

    looker = threading.Thread(target=look_again_and_again, daemon=True)
    looker.start()
    try:
        code = main(["dlq", "replay", topology.queue, "--all", "--window", str(WINDOW)])
    finally:
        stop.set()
        looker.join(30)
    out = capsys.readouterr().out
    replayed = int(re.search(r"replayed (\d+) message\(s\)", out).group(1))
    assert code == 0 and looks
    assert replayed >= MANY - 2 * WINDOW  # a look hides at most its window, briefly
    assert broker.depth(topology.queue) == replayed  # what it says it replayed, it replayed
    assert broker.depth(topology.dead_queue) == MANY - replayed  # and nothing else moved
    if replayed < MANY:  # the looks held the rest: it says so
        assert f"another reader was attached to {topology.dead_queue}" in out


def test_a_dead_letter_goes_back_to_its_own_work_queue_whatever_its_headers_say(broker):
    topology, other = declared(broker), declared(broker, "other")
    message = dead_letter(1, **{"x-original-queue": other.queue})
    ConfirmedPublisher(broker.amqp_url, "", "test-fill").publish_all(
        [Outgoing(topology.dead_queue, message.body, message.properties)]
    )
    outcome = DeadLetters(broker.amqp_url, topology.queue).replay(None)
    assert outcome.done == 1
    assert broker.depth(topology.queue) == 1 and broker.depth(other.queue) == 0


def test_the_commands_list_and_show_past_the_window(broker, monkeypatch, capsys):
    monkeypatch.setenv("AMQP_URL", broker.amqp_url)
    topology = declared(broker)
    fill(broker, topology, 1000)
    assert main(["dlq", "list", topology.queue, "--window", "100"]) == 0
    listing = capsys.readouterr().out
    assert f"{topology.dead_queue}: 1000 dead message(s); grouped below: the 100 at its head" in (
        listing
    )
    assert sum(int(line.split()[0]) for line in listing.splitlines()[1:]) == 100

    assert main(["dlq", "show", topology.queue, "--id", "m-900", "--window", "100"]) == 0
    shown = capsys.readouterr().out
    assert "message_id: m-900" in shown and '"n": 900' in shown
    assert main(["dlq", "show", topology.queue, "--id", "m-5000", "--window", "100"]) == 1
    assert "no message m-5000 among the 1000 scanned" in capsys.readouterr().err
    assert broker.depth(topology.dead_queue) == 1000  # showing takes nothing away


def drained(broker, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    conn = connect(broker.amqp_url, "test-drain")
    try:
        channel, found = conn.channel(), []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((properties, body))
    finally:
        conn.close()
