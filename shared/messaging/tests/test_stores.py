"""The store adapters' common parts (messaging.stores): error translation, version gates and
write probes, against the real PostgreSQL and Redis where they are about them."""

from __future__ import annotations

import pytest
from messaging import RetryableError, StoreUnavailable
from messaging.stores import redis_errors


@pytest.mark.unit
@pytest.mark.parametrize(
    ("reply", "outage"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", True),
        ("READONLY You can't write against a read only replica.", True),
        ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable", True),
        ("NOREPLICAS Not enough good replicas to write.", True),
        ("BUSY Redis is busy running a script.", True),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
    ],
)
def test_write_refusals_are_outages_and_other_errors_the_changes_own(reply, outage):
    from redis._parsers import _RESP2Parser

    parsed = _RESP2Parser(65536).parse_error(reply)  # the error redis-py raises for that reply
    expected = StoreUnavailable if outage else RetryableError
    with pytest.raises(expected), redis_errors():
        raise parsed
