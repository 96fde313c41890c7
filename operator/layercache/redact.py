"""Secret scrubbing for every message that may reach logs, status, events or metrics.

Two kinds of secret reach our messages:

- values we hold ourselves (registry passwords and tokens, the peer token): `redact` blanks
  out each occurrence of each value, whatever text it is in (a daemon's error details, an
  exception message);
- secrets carried inside URLs, which any URL we print may hold: the userinfo part
  (``https://user:password@host/``, RFC 3986 §3.2.1) and the query (a pre-signed storage
  redirect carries its credentials there, e.g. ``X-Amz-Signature``): `redact_urls` blanks
  both out of every URL in a text, keeping scheme, host, port and path for diagnosis.

`RedactingFilter` applies `redact_urls` to every record of the loggers it is added to (the
registry client adds it to httpx's and httpcore's, which log whole request URLs).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Final

__all__ = ["REDACTED", "RedactingFilter", "redact", "redact_urls"]

#: What stands where a secret was.
REDACTED: Final = "<redacted>"

# scheme "://" [userinfo "@"] host-and-path ["?" query]; a URL ends at white space or quotes.
_URL: Final = re.compile(
    r"\b(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^\s/?#@\"']*@)?"
    r"(?P<rest>[^\s?#\"']*)(?P<query>\?[^\s#\"']*)?")


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each non-empty secret replaced by `REDACTED`."""
    # Longest first, so a secret that contains another is blanked out whole.
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _redact_url(match: re.Match[str]) -> str:
    userinfo = f"{REDACTED}@" if match.group("userinfo") else ""
    query = f"?{REDACTED}" if match.group("query") else ""
    return f"{match.group('scheme')}{userinfo}{match.group('rest')}{query}"


def redact_urls(text: str) -> str:
    """``text`` with the userinfo and the query of every URL in it replaced by `REDACTED`.

    ``https://u:p@reg.example/v2/?sig=s`` → ``https://<redacted>@reg.example/v2/?<redacted>``;
    a URL without either, and text without URLs, come back unchanged.
    """
    return _URL.sub(_redact_url, text)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message and string arguments with `redact_urls`; drops nothing.

    httpx logs every request at INFO as ``HTTP Request: GET <url> "HTTP/1.1 200 OK"``, the
    whole URL included: for a blob redirected to object storage, its pre-signed query.
    httpcore's DEBUG traces print response headers, a redirect's ``Location`` among them.
    Only ``str`` arguments and those of ``url_types`` (e.g. ``httpx.URL``) are rewritten
    (as ``str``), so a number still fits its ``%d``.
    """

    def __init__(self, *url_types: type) -> None:
        super().__init__()
        self.url_types = (str, *url_types)

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always True (the record is kept)."""
        if isinstance(record.args, tuple):
            record.args = tuple(redact_urls(str(arg)) if isinstance(arg, self.url_types) else arg
                                for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = redact_urls(record.msg)
        return True
