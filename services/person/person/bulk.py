"""A bulk body read as it arrives: counted and checked item by item, never held whole.

POST /person/bulk takes a JSON array (parsed incrementally by ijson) or NDJSON (line by line).
Each item is parsed on its own, checked to be an object, and written compactly to a spooled
file (in memory up to SPOOL_IN_MEMORY, on disk past it), one line each; the import's rows are
then copied from that file. So an import costs the API a chunk of the body and one item at a
time, whatever its size, and an over-count body stops at the first item too many. Validation of
each person is the importer's (as POST /person validates).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import ijson
from servicekit.web import reject_constant

CHUNK = 64 * 1024
SPOOL_IN_MEMORY = 1024 * 1024
NOT_OBJECTS_SHOWN = 20
_WHITESPACE = b" \t\n\r"
MAX_DEPTH = 64  # an item nested deeper than this is no person
_STARTS, _ENDS = ("start_map", "start_array"), ("end_map", "end_array")


class BulkRefused(Exception):
    """A bulk body refused as a whole, with the status and reasons to answer."""

    def __init__(self, status: int, message: str, errors: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors


class BulkItems:
    """The items of one body, compact JSON, one per line of a spooled file."""

    def __init__(self, most: int) -> None:
        self.most, self.count = most, 0
        self.not_objects: list[int] = []  # the first few indexes of items that are not objects
        self.not_objects_count = 0
        # Closed by close() (the caller's `with`), not here.
        self._file = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=SPOOL_IN_MEMORY, mode="w+b"
        )

    def add(self, item: Any) -> None:
        if self.count >= self.most:
            raise BulkRefused(413, f"too many people: more than {self.most} per import")
        if not isinstance(item, dict):
            self.not_objects_count += 1
            if len(self.not_objects) < NOT_OBJECTS_SHOWN:
                self.not_objects.append(self.count)
        try:
            text = json.dumps(item, separators=(",", ":"), allow_nan=False)
        except ValueError as exc:  # a number too large for a float: Infinity is not JSON
            reason = f"the body is not valid JSON: item {self.count}: {exc}"
            raise BulkRefused(400, reason) from None
        self._file.write(text.encode())  # ASCII: escapes keep each item on one line
        self._file.write(b"\n")
        self.count += 1

    def texts(self) -> Iterator[str]:
        """Each item's JSON text, in order."""
        self._file.seek(0)
        for line in self._file:
            yield line[:-1].decode()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> BulkItems:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_items(stream: IO[bytes], ndjson: bool, most: int) -> BulkItems:
    """The body's items, checked; BulkRefused (400, 413, 422) as soon as it is known to be
    refused. The caller closes what it gets."""
    items = BulkItems(most)
    try:
        try:
            (_ndjson if ndjson else _array)(stream, items)
        except RecursionError:
            raise BulkRefused(400, "the body is nested too deeply") from None
        if not items.count:
            raise BulkRefused(422, "the body has no people", {"body": ["must not be empty"]})
        if items.not_objects_count:
            errors = {str(index): ["must be a JSON object"] for index in items.not_objects}
            raise BulkRefused(422, f"{items.not_objects_count} items are not objects", errors)
    except BaseException:
        items.close()
        raise
    return items


def _empty() -> BulkRefused:
    return BulkRefused(400, "the body is empty; a JSON array of people was expected")


def _ndjson(stream: IO[bytes], items: BulkItems) -> None:
    number, seen = 0, False
    for line in _lines(stream):
        number += 1
        if not line.strip():
            continue
        seen = True
        try:
            item = json.loads(line, parse_constant=reject_constant)
        except ValueError as exc:  # UnicodeDecodeError too
            raise BulkRefused(400, f"the body is not valid JSON: line {number}: {exc}") from None
        items.add(item)
    if not seen:
        raise _empty()


def _lines(stream: IO[bytes]) -> Iterator[bytes]:
    pending: list[bytes] = []
    while chunk := stream.read(CHUNK):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pending.append(chunk[start:end])
            yield b"".join(pending)
            pending, start = [], end + 1
        pending.append(chunk[start:])
    if any(pending):
        yield b"".join(pending)


def _array(stream: IO[bytes], items: BulkItems) -> None:
    first = b""
    while not first.strip(_WHITESPACE):  # up to the first byte that is not whitespace
        chunk = stream.read(CHUNK)
        if not chunk:
            raise _empty()
        first += chunk
    if not first.lstrip(_WHITESPACE).startswith(b"["):
        _not_an_array(first + stream.read())  # bounded by BULK_MAX_BYTES, like any body
    try:
        events = ijson.basic_parse(_Rewound(first, stream), use_float=True)
        next(events)  # the array's start
        depth, builder = 1, None  # depth 1: between the array's items
        for event, value in events:
            if event in _STARTS:
                depth += 1
                if depth > MAX_DEPTH:  # ijson would build (and the importer read) any depth
                    raise BulkRefused(400, "the body is nested too deeply")
            elif event in _ENDS:
                depth -= 1
                if depth == 0:
                    break
            elif depth == 1:  # an item that is a plain value
                items.add(value)
                continue
            if builder is None:
                builder = ijson.ObjectBuilder()
            builder.event(event, value)
            if depth == 1:  # that event ended an item
                items.add(builder.value)
                builder = None
        for _ in events:  # anything after the array is an error the parser reports
            pass
    except ijson.JSONError as exc:  # the parser's first line: its excerpt would echo the body
        reason = str(exc.args[0] if exc.args else exc)
        if isinstance(exc.args[0] if exc.args else None, bytes):
            reason = exc.args[0].decode(errors="replace")
        raise BulkRefused(400, f"the body is not valid JSON: {reason.splitlines()[0]}") from None


def _not_an_array(body: bytes) -> None:
    try:
        json.loads(body, parse_constant=reject_constant)
    except ValueError as exc:
        raise BulkRefused(400, f"the body is not valid JSON: {exc}") from None
    raise BulkRefused(400, "the body must be a JSON array of people")


class _Rewound:
    """The stream with the bytes already read from it put back in front."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # how ijson tells bytes from text
            return b""
        if self.head:
            head, self.head = self.head, b""
            return head
        return self.stream.read(size)
