"""Errors of the registry client, classified as retry-later or give-up.

Every error names what it was about (a reference, a registry host, a field) and never
carries credentials, tokens or a URL query string (signed redirect URLs hold secrets there).

Classification (what `layercache.registry.retry` and callers act on):

- `TransientError` and its subclasses — connection failures, 5xx, 429, a body cut short:
  retried with backoff inside one request's retry budget; when the budget is spent the last
  one propagates and the caller may try again later.
- Everything else — bad input, auth refused, not found, malformed or unsupported manifests,
  a digest mismatch — is final for that request: retrying cannot change the answer.
"""

from __future__ import annotations

from layercache.oci.digest import DigestMismatchError

__all__ = [
    "AccessDeniedError",
    "AuthenticationError",
    "BlobNotFoundError",
    "BlobTooLargeError",
    "DigestMismatchError",
    "IncompleteBodyError",
    "ManifestError",
    "ManifestNotFoundError",
    "NoMatchingPlatformError",
    "NonDistributableLayerError",
    "RateLimitedError",
    "RegistryAuthError",
    "RegistryConfigError",
    "RegistryConnectionError",
    "RegistryDigestMismatchError",
    "RegistryError",
    "RegistryStatusError",
    "ServerError",
    "TransientError",
    "UnsupportedCredentialsError",
    "UnsupportedDigestError",
    "UnsupportedManifestError",
    "UnsupportedMediaTypeError",
    "retry_after",
]


class RegistryError(Exception):
    """Base of every error `layercache.registry` raises for a request or a resolution.

    Callers can catch this one class; only invalid arguments (an unparsable reference or
    platform string) raise something else.
    """


class RegistryDigestMismatchError(DigestMismatchError, RegistryError):
    """Bytes from a registry do not hash to their digest (final: the sink discarded them).

    The one `layercache.oci.digest.DigestMismatchError` (``expected``, ``actual``, ``size``;
    this module re-exports it under that name), raised by the registry client as a
    `RegistryError` too, so either ``except`` catches it.
    """


class RegistryConfigError(RegistryError):
    """Our own settings for a registry are unusable (e.g. its CA file cannot be loaded)."""


class RegistryStatusError(RegistryError):
    """The registry answered an HTTP status we do not expect and will not retry.

    Attributes:
        status: the HTTP status code.
        what: what was asked for, e.g. ``GET 127.0.0.1:5000/v2/family/base/manifests/v1``
            (no query string).
        codes: distribution error codes from the JSON body (``errors[].code``), if any.

    """

    def __init__(
        self, status: int, what: str, codes: tuple[str, ...] = (), detail: str = ""
    ) -> None:
        codes_text = f" ({', '.join(codes)})" if codes else ""
        detail_text = f": {detail}" if detail else ""
        super().__init__(f"{what}: HTTP {status}{codes_text}{detail_text}")
        self.status = status
        self.what = what
        self.codes = codes


class ManifestNotFoundError(RegistryStatusError):
    """The registry has no such repository, tag or manifest (404, ``MANIFEST_UNKNOWN``…)."""


class BlobNotFoundError(RegistryStatusError):
    """The registry has no such blob in that repository (404, ``BLOB_UNKNOWN``)."""


class TransientError(RegistryError):
    """A failure that may go away: retried with backoff within the request's budget.

    ``retry_after`` (seconds, or None) is the server's ``Retry-After``, when it sent one.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after(error: BaseException | None) -> float | None:
    """The server's ``Retry-After`` (seconds) carried by ``error``, or None.

    A `TransientError` (429, 503) has one when the server sent it. Callers that schedule
    their own next attempt (the operator's re-resolve, the agent's layer retry) must not
    make it sooner than that.
    """
    return error.retry_after if isinstance(error, TransientError) else None


class RegistryConnectionError(TransientError):
    """Connecting, sending or reading failed (refused, reset, timeout, TLS handshake…)."""


class ServerError(TransientError):
    """The registry answered 5xx."""

    def __init__(self, status: int, what: str, retry_after: float | None = None) -> None:
        super().__init__(f"{what}: HTTP {status} (server error)", retry_after)
        self.status = status


class RateLimitedError(TransientError):
    """The registry answered 429 Too Many Requests."""

    def __init__(self, what: str, retry_after: float | None = None) -> None:
        after = f", Retry-After {retry_after:g} s" if retry_after is not None else ""
        super().__init__(f"{what}: HTTP 429 (rate limited{after})", retry_after)
        self.status = 429


class IncompleteBodyError(TransientError):
    """A response body ended before the size it promised (connection closed early)."""


class RegistryAuthError(RegistryError):
    """Authentication or authorisation failed; never retried beyond one token refresh."""


class AuthenticationError(RegistryAuthError):
    """The registry (or its token server) refused us: no credentials, or wrong ones."""


class AccessDeniedError(RegistryAuthError):
    """Authenticated, but not allowed: 403, or a token without the scope asked for."""


class UnsupportedCredentialsError(RegistryAuthError):
    """The Docker config names a credential source we cannot use (credential helpers)."""


class ManifestError(RegistryError):
    """A manifest, index or config is malformed; names the reference and the field.

    Attributes:
        reference: the image reference (or ``name@digest``) the document belongs to.
        field: dotted path of the offending field (``layers[2].size``), or ``body``.
        reason: what is wrong with it.

    """

    def __init__(self, reference: str, field: str, reason: str) -> None:
        super().__init__(f"{reference}: {field}: {reason}")
        self.reference = reference
        self.field = field
        self.reason = reason


class UnsupportedManifestError(ManifestError):
    """A well-formed document of a kind we do not handle (Docker schema 1, an artifact…)."""


class UnsupportedMediaTypeError(ManifestError):
    """A layer or config media type we do not know (or cannot use, e.g. encrypted layers)."""


class UnsupportedDigestError(ManifestError):
    """A well-formed digest whose algorithm we cannot compute (not sha256/sha512)."""


class BlobTooLargeError(ManifestError):
    """A declared or received size is negative or beyond our cap for that kind of blob."""


class NonDistributableLayerError(RegistryError):
    """A foreign / non-distributable layer was asked for: it is reported, never fetched.

    Such layers (Windows base layers, OCI ``nondistributable`` media types) are meant to come
    from the ``urls`` in their descriptor, not from the registry; pre-warming them is the
    runtime's business.
    """

    def __init__(self, digest: str, media_type: str) -> None:
        super().__init__(f"layer {digest} ({media_type}) is non-distributable: not fetched")
        self.digest = digest
        self.media_type = media_type


class NoMatchingPlatformError(RegistryError):
    """The image has no manifest for the wanted platform; names the reference and offers.

    Either an index without a matching entry, or a single manifest built for another
    platform (containerd refuses those too).
    """

    def __init__(
        self, reference: str, wanted: str, offered: tuple[str, ...], note: str = ""
    ) -> None:
        listed = ", ".join(offered) if offered else "nothing runnable"
        super().__init__(f"{reference}: no manifest for {wanted}; it offers: {listed}{note}")
        self.reference = reference
        self.wanted = wanted
        self.offered = offered
