"""layercache.httprange: RFC 9110 §14 range requests, client and server side."""

from __future__ import annotations

import pytest

from layercache.httprange import (
    RangeNotSatisfiableError,
    content_range,
    content_range_start,
    parse_range,
    refused_resume,
    resume_headers,
    unsatisfied_range,
)


@pytest.mark.parametrize(("header", "size", "expected"), [
    ("bytes=0-0", 1, (0, 0)),  # §14.1.2: first byte only
    ("bytes=0-", 1, (0, 0)),
    ("bytes=9-", 10, (9, 9)),  # the last byte by position
    ("bytes=-1", 10, (9, 9)),  # ... and by suffix
    ("bytes=-10", 10, (0, 9)),  # a suffix as long as the body: all of it
    ("bytes=3-3000", 10, (3, 9)),  # last-pos past the end is cut to it (§14.1.2)
    ("Bytes=1-2", 10, (1, 2)),  # units compare case-insensitively (§14.1)
    ("  bytes=1-2 ", 10, (1, 2)),
    ("bytes=1-2, 4-5", 10, None),  # several ranges: the server may serve all (§14.2)
    ("bytes=a-b", 10, None),  # malformed: ignored
    ("bytes = 1-2", 10, None),
    ("bytes=1-2-3", 10, None),
    ("", 10, None),
])
def test_parse_range_edges(header: str, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [
    ("bytes=10-", 10),  # first-pos at the length: nothing to send (§14.1.2)
    ("bytes=10-20", 10),
    ("bytes=0-", 0),  # an empty body satisfies no range
    ("bytes=-5", 0),
    ("bytes=-0", 10),  # a zero-length suffix
])
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiableError) as info:
        parse_range(header, size)
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working
    assert repr(header) in str(info.value)


def test_response_headers() -> None:
    assert content_range(0, 9, 10) == "bytes 0-9/10"
    assert unsatisfied_range(10) == "bytes */10"  # §14.4: the 416 form
    assert resume_headers(0) == {}
    assert resume_headers(42) == {"Range": "bytes=42-"}
    with pytest.raises(ValueError, match="offset"):
        resume_headers(-1)


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes 42-99/100", 42),
    ("bytes 42-99/*", 42),  # complete length unknown
    ("BYTES 0-0/1", 0),
    (" bytes 5-5/6 ", 5),
    ("bytes 50-40/100", None),  # last before first: invalid (§14.4)
    ("bytes 0-99/99", None),  # complete length not above last-pos: invalid
    ("bytes */100", None),  # the 416 form names no first byte
    ("bytes=0-9", None),
    (None, None),
])
def test_content_range_start(header: str | None, expected: int | None) -> None:
    assert content_range_start(header) == expected


@pytest.mark.parametrize(("status", "header", "offset", "refused"), [
    (206, "bytes 1000-9999/10000", 1000, False),
    (206, "bytes 0-9999/10000", 1000, True),
    (206, "bytes 1000-999/10000", 1000, True),  # an invalid Content-Range is no agreement
    (206, None, 1000, True),
    (416, "bytes */10000", 1000, True),
    (200, None, 1000, False),
    (416, None, 0, False),
])
def test_refused_resume(status: int, header: str | None, offset: int, refused: bool) -> None:
    reason = refused_resume(status, header, offset)
    assert (reason is not None) == refused
    if reason is not None:
        assert f"from {offset}" in reason
