"""layercache.redact: secret values, URL userinfo and URL queries never reach a message."""

from __future__ import annotations

import logging

import httpx
import pytest

from layercache.redact import REDACTED, RedactingFilter, redact, redact_urls


def test_redact_blanks_every_secret_longest_first() -> None:
    assert redact("user pw pwlong pw", ["pw", "pwlong", ""]) == (
        f"user {REDACTED} {REDACTED} {REDACTED}")
    assert redact("nothing secret", []) == "nothing secret"


@pytest.mark.parametrize(("text", "expected"), [
    # RFC 3986 §3.2.1 userinfo: user and password both go, the host stays.
    ("pull https://alice:s3cret@reg.example:5000/v2/x failed",
     "pull https://<redacted>@reg.example:5000/v2/x failed"),
    ("http://token@127.0.0.1/v2/", "http://<redacted>@127.0.0.1/v2/"),
    # userinfo and a pre-signed query in one URL.
    ("GET https://u:p@s3.example/b?X-Amz-Signature=abc#frag",
     "GET https://<redacted>@s3.example/b?<redacted>#frag"),
    # two URLs in one text, quoted.
    ("'https://a.example/?t=1' and \"http://b:c@d.example/p?q\"",
     "'https://a.example/?<redacted>' and \"http://<redacted>@d.example/p?<redacted>\""),
    # an @ in the path is no userinfo.
    ("https://reg.example/v2/lib@x/manifests/latest",
     "https://reg.example/v2/lib@x/manifests/latest"),
    ("user@example.com asked?", "user@example.com asked?"),
])
def test_redact_urls_userinfo_and_query(text: str, expected: str) -> None:
    assert redact_urls(text) == expected


def test_filter_rewrites_str_and_url_arguments_only(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("layercache.test_redact")
    redacting = RedactingFilter(httpx.URL)
    logger.addFilter(redacting)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("%s %s %d", httpx.URL("https://u:p@h.example/a?sig=1"),
                        "http://h.example/?x", 200)
            logger.info("direct https://h.example/?k=v")
    finally:
        logger.removeFilter(redacting)
    assert [r.getMessage() for r in caplog.records] == [
        "https://<redacted>@h.example/a?<redacted> http://h.example/?<redacted> 200",
        "direct https://h.example/?<redacted>",
    ]
