"""WWW-Authenticate parsing (RFC 9110 §11.6.1, RFC 6750 §3), as a table. Pure."""

from __future__ import annotations

import pytest

from layercache.registry.challenge import Challenge, ChallengeParseError, parse_www_authenticate

HUB = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
    'scope="repository:library/ubuntu:pull"'
)

# (header value(s), expected challenges)
VALID: list[tuple[str | list[str], list[Challenge]]] = [
    (
        HUB,
        [
            Challenge(
                "bearer",
                {
                    "realm": "https://auth.docker.io/token",
                    "service": "registry.docker.io",
                    "scope": "repository:library/ubuntu:pull",
                },
            )
        ],
    ),
    ('Basic realm="layercache-testbed"', [Challenge("basic", {"realm": "layercache-testbed"})]),
    # Scheme and parameter names are case-insensitive; values are not touched.
    ('BASIC Realm="Mixed Case"', [Challenge("basic", {"realm": "Mixed Case"})]),
    # Unquoted token values and optional whitespace around '=' and ','.
    (
        "Bearer realm=tokens , service = reg",
        [Challenge("bearer", {"realm": "tokens", "service": "reg"})],
    ),
    # A scope holding several space-separated scopes, colons and commas inside quotes.
    (
        'Bearer realm="r",scope="repository:a/b:pull,push repository:127.0.0.1:5000/c:pull"',
        [
            Challenge(
                "bearer",
                {
                    "realm": "r",
                    "scope": "repository:a/b:pull,push repository:127.0.0.1:5000/c:pull",
                },
            )
        ],
    ),
    # quoted-pair escapes inside a quoted-string.
    (r'Basic realm="say \"hi\" \\ bye"', [Challenge("basic", {"realm": 'say "hi" \\ bye'})]),
    # Empty quoted value.
    ('Basic realm=""', [Challenge("basic", {"realm": ""})]),
    # RFC 6750 error parameters on an insufficient-scope answer.
    (
        'Bearer realm="r",service="s",scope="repository:x:pull",error="insufficient_scope"',
        [
            Challenge(
                "bearer",
                {
                    "realm": "r",
                    "service": "s",
                    "scope": "repository:x:pull",
                    "error": "insufficient_scope",
                },
            )
        ],
    ),
    # Two challenges in one value: a bare token after a comma starts the next one.
    (
        'Basic realm="a", Bearer realm="b", service="c"',
        [Challenge("basic", {"realm": "a"}), Challenge("bearer", {"realm": "b", "service": "c"})],
    ),
    # Two header fields.
    (
        ['Basic realm="a"', 'Bearer realm="b"'],
        [Challenge("basic", {"realm": "a"}), Challenge("bearer", {"realm": "b"})],
    ),
    # A scheme with no parameters, then one with parameters.
    ("Negotiate, Basic realm=x", [Challenge("negotiate"), Challenge("basic", {"realm": "x"})]),
    # token68 (with padding), alone and followed by another challenge.
    (
        "Negotiate YIIBzgYGKwYBBQUCoIIBwjCCAb6g==",
        [Challenge("negotiate", token68="YIIBzgYGKwYBBQUCoIIBwjCCAb6g==")],
    ),
    (
        "Foo abc=, Basic realm=x",
        [Challenge("foo", token68="abc="), Challenge("basic", {"realm": "x"})],
    ),
    # Empty list elements are allowed by the #rule.
    (', , Basic realm="a",, ', [Challenge("basic", {"realm": "a"})]),
    ("", []),
    (",", []),
]


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_parses(header: str | list[str], expected: list[Challenge]) -> None:
    assert parse_www_authenticate(header) == expected


# (header, fragment of the reason)
INVALID = [
    ('Bearer realm="unterminated', "unterminated quoted-string"),
    ('Bearer realm="a" service="b"', "expected ','"),
    ('Bearer realm="a", realm="b"', "given twice"),
    ("Bearer =x", "auth-params or a token68"),
    ('"quoted" realm=x', "auth-scheme"),
    ('Bearer realm="a", "b"', "next challenge"),
    ("Foo abc== def", "after token68"),
    # A URL is not a token: realms with ':' or '/' must be quoted.
    ("Bearer realm=https://a/token", "expected ','"),
    ('Basic\trealm="x"y', "expected ','"),
    ('Basic,realm="x"', "auth-scheme"),
]


@pytest.mark.parametrize(("header", "reason"), INVALID)
def test_rejects(header: str, reason: str) -> None:
    with pytest.raises(ChallengeParseError, match=reason) as info:
        parse_www_authenticate(header)
    assert 0 <= info.value.position <= len(header)


def test_accessors() -> None:
    (challenge,) = parse_www_authenticate(HUB + ',error="insufficient_scope"')
    assert challenge.realm == "https://auth.docker.io/token"
    assert challenge.service == "registry.docker.io"
    assert challenge.scope == "repository:library/ubuntu:pull"
    assert challenge.error == "insufficient_scope"
    assert Challenge("basic").realm is None
