"""Parse ``WWW-Authenticate`` challenges (RFC 9110 §11.6.1, RFC 6750 §3).

A small parser of our own: the maintained HTTP clients keep theirs private (httpx parses
only Digest challenges, internally) and the stand-alone packages are unmaintained. The
grammar, from RFC 9110 (§5.6.2 token, §5.6.4 quoted-string, §11.2 token68)::

    WWW-Authenticate = #challenge
    challenge        = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
    auth-param       = token BWS "=" BWS ( token / quoted-string )
    token68          = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="

One header value may hold several challenges, and commas separate both challenges and
their parameters: after a comma, ``name=`` continues the current challenge while a bare
token starts the next one. Scheme and parameter names are case-insensitive (we lower-case
them); values are kept as sent (quoted-pair escapes removed).

Registries answer ``Bearer realm="https://auth.example/token",service="reg",
scope="repository:a/b:pull"`` (distribution token spec) or ``Basic realm="…"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

__all__ = ["Challenge", "ChallengeParseError", "parse_www_authenticate"]

_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_OWS: Final = re.compile(r"[ \t]*")


class ChallengeParseError(ValueError):
    """A ``WWW-Authenticate`` value does not follow RFC 9110's challenge grammar.

    ``position`` is the 0-based character offset where parsing stopped.
    """

    def __init__(self, header: str, position: int, reason: str) -> None:
        super().__init__(f"malformed WWW-Authenticate {header!r} at {position}: {reason}")
        self.header = header
        self.position = position
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge: lower-cased ``scheme``, then ``params`` or a ``token68`` (never both).

    Parameter names in ``params`` are lower-cased; values are as sent.
    """

    scheme: str
    params: dict[str, str] = field(default_factory=dict)
    token68: str | None = None

    @property
    def realm(self) -> str | None:
        """The ``realm`` parameter: for Bearer, the token endpoint URL."""
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        """The ``service`` parameter (token audience), Bearer only."""
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        """The ``scope`` parameter: space-separated ``type:name:actions`` scopes."""
        return self.params.get("scope")

    @property
    def error(self) -> str | None:
        """The ``error`` parameter (RFC 6750 §3.1), e.g. ``insufficient_scope``."""
        return self.params.get("error")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, reason: str) -> ChallengeParseError:
        return ChallengeParseError(self.text, self.pos, reason)

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ows(self) -> None:
        match = _OWS.match(self.text, self.pos)
        assert match is not None  # [ \t]* always matches
        self.pos = match.end()

    def match(self, pattern: re.Pattern[str]) -> str | None:
        found = pattern.match(self.text, self.pos)
        if found is None:
            return None
        self.pos = found.end()
        return found.group()

    def quoted_string(self) -> str:
        # At the opening DQUOTE. quoted-pair = "\" ( HTAB / SP / VCHAR / obs-text ).
        self.pos += 1
        out: list[str] = []
        while not self.at_end():
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\\":
                if self.pos + 1 >= len(self.text):
                    break
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            out.append(char)
            self.pos += 1
        raise self.fail("unterminated quoted-string")

    def try_param(self) -> tuple[str, str] | None:
        """An auth-param at the current position, or None (position unchanged)."""
        start = self.pos
        name = self.match(_TOKEN)
        if name is not None:
            self.skip_ows()
            if self.peek() == "=":
                self.pos += 1
                self.skip_ows()
                if self.peek() == '"':
                    return name.lower(), self.quoted_string()
                value = self.match(_TOKEN)
                if value is not None:
                    return name.lower(), value
        self.pos = start
        return None


def parse_www_authenticate(values: str | Iterable[str]) -> list[Challenge]:
    """Every challenge in one ``WWW-Authenticate`` value, or in several (one per header).

    Returns challenges in the order sent; an empty or all-comma value gives none.

    Raises:
        ChallengeParseError: the text does not follow the grammar (names the offset);
            also for a parameter given twice in one challenge (RFC 9110 §11.2: a name
            MUST occur once).

    """
    if isinstance(values, str):
        values = [values]
    challenges: list[Challenge] = []
    for value in values:
        challenges.extend(_parse_one(value))
    return challenges


def _parse_one(text: str) -> list[Challenge]:
    scan = _Scanner(text)
    challenges: list[Challenge] = []
    while True:
        _skip_separators(scan)
        if scan.at_end():
            return challenges
        scheme = scan.match(_TOKEN)
        if scheme is None:
            raise scan.fail("expected an auth-scheme token")
        challenges.append(_parse_rest(scan, scheme.lower()))


def _skip_separators(scan: _Scanner) -> None:
    # Empty list elements (",,") are allowed by the #rule (RFC 9110 §5.6.1).
    while True:
        scan.skip_ows()
        if scan.peek() != ",":
            return
        scan.pos += 1


def _parse_rest(scan: _Scanner, scheme: str) -> Challenge:
    """Parameters or token68 after a scheme; stops before the next challenge's scheme."""
    had_space = scan.peek() in (" ", "\t")
    scan.skip_ows()
    if scan.at_end() or scan.peek() == ",":
        return Challenge(scheme)
    if not had_space:
        raise scan.fail("expected a space after the auth-scheme")
    first = scan.try_param()
    if first is None:
        token68 = scan.match(_TOKEN68)
        if token68 is None:
            raise scan.fail("expected auth-params or a token68")
        scan.skip_ows()
        if not (scan.at_end() or scan.peek() == ","):
            raise scan.fail("unexpected text after token68")
        return Challenge(scheme, token68=token68)
    params = dict([first])
    while True:
        scan.skip_ows()
        if scan.at_end():
            return Challenge(scheme, params)
        if scan.peek() != ",":
            raise scan.fail("expected ',' between auth-params")
        _skip_separators(scan)
        if scan.at_end():
            return Challenge(scheme, params)
        param = scan.try_param()
        if param is None:
            # A bare token here starts the next challenge: leave it for the caller.
            if _TOKEN.match(scan.text, scan.pos) is None:
                raise scan.fail("expected an auth-param or the next challenge")
            return Challenge(scheme, params)
        name, value = param
        if name in params:
            raise scan.fail(f"parameter {name!r} given twice")
        params[name] = value
