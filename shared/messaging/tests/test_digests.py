"""Digests (messaging.digests): the same in SQL and Python, kept by the relay as it marks rows
published, in any order and any grouping, and backfilled for an outbox that published before
it kept them."""

from __future__ import annotations

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from messaging import digests
from messaging.outbox import Outbox, install, published_versions
from messaging.outbox import digests as producer_digests
from messaging.relay import MARK_SQL

pytestmark = pytest.mark.integration

# Any text PostgreSQL can hold: no NUL, no lone surrogate (UTF-8 cannot encode one).
IDS = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
)


@given(
    entity=st.sampled_from(["person", "income", "ação"]),
    entity_id=IDS,
    version=st.integers(1, 2**40),
)
# No deadline: each example is a round trip to PostgreSQL, which a loaded CI machine answered in
# 324 ms once (hypothesis's default deadline is 200 ms; speed is the benchmark's to measure).
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_sql_and_python_agree_on_buckets_and_contributions(producer_db, entity, entity_id, version):
    with psycopg.connect(producer_db) as conn:
        names = {"entity": "%(e)s", "entity_id": "%(i)s", "version": "%(v)s::bigint"}
        bucket_sql = digests.sql_with_params(digests.BUCKET_SQL).format(**names)
        part_sql = digests.sql_with_params(digests.CONTRIBUTION_SQL).format(**names)
        bucket, part = conn.execute(
            f"SELECT {bucket_sql}, {part_sql}", {"e": entity, "i": entity_id, "v": version}
        ).fetchone()
    assert bucket == digests.bucket(entity, entity_id)
    assert part == digests.contribution(entity, entity_id, version)
    assert 0 <= bucket < digests.BUCKETS and 0 <= part < digests.MODULUS


def test_differing_names_the_buckets_either_side_lacks_or_sums_differently():
    producer = {"person": {1: (10, 1), 2: (20, 2)}, "debt": {5: (1, 1)}}
    model = {"person": {1: (10, 1), 3: (7, 1)}}
    assert digests.differing(producer, model, ["person", "debt"]) == {
        "person": [2, 3],
        "debt": [5],
    }
    assert digests.differing(producer, producer, ["person", "debt"]) == {}
    assert digests.decode(digests.encode(producer)) == producer


@pytest.mark.parametrize(
    "raw",
    [None, [], {"person": 5}, {"person": [[1, 2]]}, {"person": [[5000, 1, 1]]},
     {"person": [[1, -1, 1]]}, {"person": [["1", 2, 3]]}, {"person": [[1, True, 1]]}],
)  # fmt: skip
def test_digests_that_are_not_digests_are_refused(raw):
    with pytest.raises(ValueError):
        digests.decode(raw)


# An event of one history: (entity id, deleted?). Versions follow per entity, as the outbox's.
EVENTS = st.lists(st.tuples(st.sampled_from("abcdefgh"), st.booleans()), min_size=1, max_size=30)


def _write(conn: psycopg.Connection, events: list[tuple[str, bool]]) -> list[int]:
    outbox = Outbox("test")
    with conn.transaction(), conn.cursor() as cur:
        for entity_id, deleted in events:
            outbox.add(
                cur,
                event_type="thing.deleted" if deleted else "thing.updated",
                entity_id=entity_id,
                data=None if deleted else {"n": 1},
            )
    return [row[0] for row in conn.execute("SELECT id FROM messaging_outbox ORDER BY id")]


def _expected(conn: psycopg.Connection) -> dict[str, int]:
    """The newest published version of each live entity (its newest event no deletion), read
    from the outbox itself: what the digests count."""
    rows = conn.execute(
        "SELECT DISTINCT ON (entity_id) entity_id, entity_version, event_type "
        "FROM messaging_outbox WHERE published_at IS NOT NULL "
        "ORDER BY entity_id, entity_version DESC"
    ).fetchall()
    return {entity_id: version for entity_id, version, kind in rows if kind != "thing.deleted"}


def _summed(versions: dict[str, int]) -> digests.Digests:
    return digests.summed(
        ("thing", digests.bucket("thing", i), digests.contribution("thing", i, v))
        for i, v in versions.items()
    )


def _clear(conn: psycopg.Connection) -> None:
    conn.execute("TRUNCATE messaging_outbox, messaging_published, messaging_digests")
    conn.commit()


@given(events=EVENTS, order=st.randoms(use_true_random=False), groups=st.integers(1, 5))
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_the_relays_digests_are_those_of_the_newest_published_versions_in_any_marking_order(
    producer_db, events, order, groups
):
    """Rows are marked in shuffled groups (an old leader's marker may mark late, a row parked
    and retried is marked after newer ones): after each mark the digests are those of the
    newest version published of each entity, never of an older one marked after it, and an
    entity whose newest published event deletes it counts nothing."""
    with psycopg.connect(producer_db) as conn:
        _clear(conn)
        ids = _write(conn, events)
        order.shuffle(ids)
        size = max(1, len(ids) // groups)
        for start in range(0, len(ids), size):
            with conn.transaction():
                conn.execute(MARK_SQL, (ids[start : start + size],))
            expected = _expected(conn)
            assert producer_digests(conn, ["thing"]) == _summed(expected)
        everything = list(range(digests.BUCKETS))
        assert published_versions(conn, "thing", everything) == _expected(conn)
        # marking again changes nothing
        with conn.transaction():
            conn.execute(MARK_SQL, (ids,))
        assert producer_digests(conn) == _summed(_expected(conn))


def test_an_outbox_that_published_before_it_kept_digests_gets_them_at_install(producer_db):
    with psycopg.connect(producer_db) as conn:
        _clear(conn)
        ids = _write(conn, [("a", False), ("b", False), ("a", False), ("d", True), ("c", True)])
        conn.execute(
            "UPDATE messaging_outbox SET published_at = now() WHERE id = ANY(%s)", (ids[:4],)
        )
        conn.execute("TRUNCATE messaging_published, messaging_digests")
        conn.commit()
        install(conn)
        assert producer_digests(conn) == _summed({"a": 2, "b": 1})
        install(conn)  # a second install adds nothing
        assert producer_digests(conn) == _summed({"a": 2, "b": 1})


def test_install_stops_counting_the_deletions_digests_kept_before(producer_db):
    """Digests kept while deletions still counted (or by a relay of that version marking after
    the upgrade): install flags each deletion and sums its bucket again, once."""
    with psycopg.connect(producer_db) as conn:
        _clear(conn)
        ids = _write(conn, [("a", False), ("b", False), ("b", True), ("c", True), ("c", False)])
        with conn.transaction():
            conn.execute(MARK_SQL, (ids,))
        assert producer_digests(conn) == _summed({"a": 1, "c": 2})
        # as an older relay kept them: every newest version counted, none flagged
        conn.execute("UPDATE messaging_published SET deleted = false")
        conn.execute("TRUNCATE messaging_digests")
        conn.execute(
            "INSERT INTO messaging_digests (entity, bucket, digest, entities) "
            f"SELECT entity, bucket, sum(contribution) % {digests.MODULUS}, count(*) "
            "FROM messaging_published GROUP BY entity, bucket"
        )
        conn.commit()
        assert producer_digests(conn) == _summed({"a": 1, "b": 2, "c": 2})

        install(conn)

        assert producer_digests(conn) == _summed({"a": 1, "c": 2})
        assert published_versions(conn, "thing", list(range(digests.BUCKETS))) == {"a": 1, "c": 2}
        install(conn)  # once flagged, nothing more
        assert producer_digests(conn) == _summed({"a": 1, "c": 2})
