"""HTTP range requests (RFC 9110 §14), the one implementation for clients and server.

Clients (the registry client's blob download, the agent's upstream and peer sources) resume
a blob with ``Range: bytes=<offset>-`` (`resume_headers`) and check the answer with
`refused_resume`: a ``206`` must start at the byte asked for (``Content-Range``, §14.4),
a ``416`` refuses; a ``200`` ignored the Range (its body starts at byte 0, which the
caller skips through or restarts from).

The server (the agent's peer blob server) reads one ``Range`` with `parse_range` and
answers ``206`` with `content_range` or ``416`` with `unsatisfied_range`. Only single
byte ranges are served: several ranges, another unit or a malformed value get the whole
representation, which §14.2 allows ("a server MAY ignore the Range header field").

Range units are compared case-insensitively (§14.1). Positions are byte offsets, inclusive
at both ends as on the wire.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "RangeNotSatisfiableError",
    "content_range",
    "content_range_start",
    "parse_range",
    "refused_resume",
    "resume_headers",
    "unsatisfied_range",
]

# §14.1.1 single int-range or suffix-range, OWS allowed around the "=" by no rule, so none.
_RANGE: Final = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII | re.IGNORECASE)
# §14.4 range-resp: "bytes" SP first-pos "-" last-pos "/" ( complete-length / "*" ).
_CONTENT_RANGE: Final = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)", re.ASCII | re.IGNORECASE)


class RangeNotSatisfiableError(ValueError):
    """A well-formed range no byte of the representation satisfies (answer ``416``)."""


def resume_headers(offset: int) -> dict[str, str]:
    """The request headers that ask for bytes ``offset`` to the end: none when 0.

    Raises:
        ValueError: ``offset`` < 0.

    """
    if offset < 0:
        raise ValueError(f"offset {offset} < 0")
    return {"Range": f"bytes={offset}-"} if offset else {}


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The byte range ``(start, end)`` (inclusive) a ``Range`` header asks of ``size`` bytes.

    ``bytes=a-b`` (``b`` past the end is cut to it), ``bytes=a-`` and the suffix form
    ``bytes=-n`` (the last ``n`` bytes, all if ``n`` >= ``size``). None means "the whole
    representation": no header, several ranges, another unit or a malformed value.

    Raises:
        RangeNotSatisfiableError: (a ``ValueError``) a well-formed range that no byte of the
            ``size`` bytes satisfies, or ``a`` > ``b``: answer ``416``.

    """
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # suffix: the last N bytes
        count = int(last)
        if count == 0 or size == 0:
            raise RangeNotSatisfiableError(f"empty suffix range {header!r} of {size} bytes")
        return max(0, size - count), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiableError(f"range {header!r} outside {size} bytes")
    return start, end


def content_range(start: int, end: int, size: int) -> str:
    """The ``Content-Range`` of a ``206`` carrying bytes ``start``..``end`` of ``size``."""
    return f"bytes {start}-{end}/{size}"


def unsatisfied_range(size: int) -> str:
    """The ``Content-Range`` of a ``416`` for a representation of ``size`` bytes."""
    return f"bytes */{size}"


def content_range_start(header: str | None) -> int | None:
    """The first byte a ``Content-Range`` value names (§14.4), or None.

    None when the value is absent, not ``bytes FIRST-LAST/(TOTAL|*)``, or invalid: LAST
    before FIRST, or TOTAL not above LAST.
    """
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match is None:
        return None
    first, last, total = int(match.group(1)), int(match.group(2)), match.group(3)
    if last < first or (total != "*" and int(total) <= last):
        return None
    return first


def refused_resume(status: int, header: str | None, offset: int) -> str | None:
    """Why an answer refuses a resume asked as ``Range: bytes=<offset>-``, or None.

    ``status`` is the answer's HTTP status and ``header`` its ``Content-Range``. Refused,
    when ``offset`` > 0: a ``206`` whose ``Content-Range`` starts at another byte (or has
    none), or a ``416``. Not refused: any other answer (a ``200`` ignores the Range: its
    body starts at byte 0).
    """
    if not offset:
        return None
    if status == 416:
        return f"asked for bytes from {offset}, got HTTP 416 (Content-Range {header})"
    if status == 206 and content_range_start(header) != offset:
        return f"asked for bytes from {offset}, got Content-Range {header}"
    return None
