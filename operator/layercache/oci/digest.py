"""OCI content digests: parse, validate, compute and verify.

A digest names a blob by its content: ``algorithm ":" encoded``, following the grammar of
the OCI image-spec descriptor (``descriptor.md``, "Digests")::

    digest                ::= algorithm ":" encoded
    algorithm             ::= algorithm-component (algorithm-separator algorithm-component)*
    algorithm-component   ::= [a-z0-9]+
    algorithm-separator   ::= [+._-]
    encoded               ::= [a-zA-Z0-9=_-]+

Of the registered algorithms we support the two that ``hashlib`` provides and registries
serve: ``sha256`` (64 lower-case hex characters) and ``sha512`` (128). A digest that is
well-formed but names another algorithm (``blake3``, ``sha384``, …) raises
`UnsupportedDigestAlgorithmError`, so callers can tell "we cannot check this" from "this is
not a digest".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "Digest",
    "DigestMismatchError",
    "DigestVerifier",
    "InvalidDigestError",
    "UnsupportedDigestAlgorithmError",
    "chain_ids",
    "next_chain_id",
    "parse_digest",
]

_GRAMMAR: Final = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+", re.ASCII)

#: Algorithm → (hashlib name, exact length of the lower-case hex encoding).
SUPPORTED_ALGORITHMS: Final[dict[str, int]] = {"sha256": 64, "sha512": 128}

_HEX: Final = frozenset("0123456789abcdef")


class InvalidDigestError(ValueError):
    """The text is not a valid digest; ``text`` and ``reason`` say which and why."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"invalid digest {text!r}: {reason}")
        self.text = text
        self.reason = reason


class UnsupportedDigestAlgorithmError(InvalidDigestError):
    """The digest is well-formed but its algorithm is not one we can compute."""

    def __init__(self, text: str, algorithm: str) -> None:
        supported = ", ".join(SUPPORTED_ALGORITHMS)
        super().__init__(text, f"unsupported algorithm {algorithm!r} (supported: {supported})")
        self.algorithm = algorithm


class DigestMismatchError(Exception):
    """Received bytes do not hash to the expected digest.

    Not a `ValueError`: the input (the expected digest) was fine; the bytes that arrived were
    not. Callers treat it as a failed transfer and fetch again, preferably from another source.
    """

    def __init__(self, expected: Digest, actual: Digest, size: int) -> None:
        super().__init__(f"digest mismatch: expected {expected}, got {actual} over {size} bytes")
        self.expected = expected
        self.actual = actual
        self.size = size


class Digest(str):
    """A validated digest, e.g. ``sha256:2c26…``; a `str`, so it keys dicts and JSON as is.

    Like go-digest's ``type Digest string``: equality and hashing are those of the text.
    Construction validates (`InvalidDigestError`, `UnsupportedDigestAlgorithmError`); there is
    no way to make an unchecked one.
    """

    __slots__ = ()

    def __new__(cls, text: str) -> Digest:
        """Validate ``text`` and return it as a `Digest`.

        Raises:
            InvalidDigestError: not of the OCI grammar, or a wrong encoding for the algorithm.
            UnsupportedDigestAlgorithmError: well-formed, algorithm other than sha256/sha512.

        """
        if type(text) is cls:
            return text
        if not isinstance(text, str):
            raise InvalidDigestError(repr(text), "not a string")
        if not _GRAMMAR.fullmatch(text):
            raise InvalidDigestError(text, _grammar_reason(text))
        algorithm, _, encoded = text.partition(":")
        length = SUPPORTED_ALGORITHMS.get(algorithm)
        if length is None:
            raise UnsupportedDigestAlgorithmError(text, algorithm)
        if len(encoded) != length or not _HEX.issuperset(encoded):
            raise InvalidDigestError(
                text, f"{algorithm} needs exactly {length} lower-case hex characters"
            )
        return super().__new__(cls, text)

    @property
    def algorithm(self) -> str:
        """The algorithm part, e.g. ``sha256``."""
        return self.partition(":")[0]

    @property
    def encoded(self) -> str:
        """The encoded (hex) part after the colon."""
        return self.partition(":")[2]

    @property
    def short(self) -> str:
        """``sha256:`` and the first 12 hex characters, for logs and messages."""
        return f"{self.algorithm}:{self.encoded[:12]}"

    @classmethod
    def from_bytes(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """Digest of ``data`` (all of it) with ``algorithm``.

        Raises:
            UnsupportedDigestAlgorithmError: ``algorithm`` is not sha256 or sha512.

        """
        if algorithm not in SUPPORTED_ALGORITHMS:
            raise UnsupportedDigestAlgorithmError(f"{algorithm}:", algorithm)
        # Valid by construction (a supported algorithm's lower-case hex): checking it
        # again would cost twice the hashing, ~10^5 times per plan (`chain_ids`).
        return str.__new__(cls, f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}")


def parse_digest(text: str) -> Digest:
    """Parse ``text`` into a `Digest`; same as ``Digest(text)``, named for readability."""
    return Digest(text)


def _grammar_reason(text: str) -> str:
    # Say which part breaks the grammar: the message is what a user fixes their spec from.
    if not text:
        return "empty"
    algorithm, colon, encoded = text.partition(":")
    if not colon:
        return "missing ':' between algorithm and encoded part"
    if not re.fullmatch(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*", algorithm, re.ASCII):
        return f"algorithm {algorithm!r} must be lower-case letters and digits (OCI grammar)"
    if not encoded:
        return "empty encoded part after ':'"
    return "encoded part may only hold letters, digits, '=', '_' and '-'"


class DigestVerifier:
    """Hash a blob as it streams in, then check it against the expected digest.

    Use: ``v = DigestVerifier(expected)``; ``v.update(chunk)`` for each chunk in order;
    ``v.verify()`` at the end. ``size`` counts the bytes fed (bytes, not chunks).
    """

    def __init__(self, expected: Digest) -> None:
        """Start hashing for ``expected`` (a validated `Digest`, so its algorithm is known)."""
        self.expected = Digest(expected)
        self._hash = hashlib.new(self.expected.algorithm)
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Feed the next chunk."""
        self._hash.update(data)
        self.size += len(data)

    def digest(self) -> Digest:
        """The digest of the bytes fed so far (does not end the stream)."""
        return Digest(f"{self.expected.algorithm}:{self._hash.hexdigest()}")

    def verify(self) -> None:
        """Check the bytes fed so far against ``expected``.

        Raises:
            DigestMismatchError: they hash to something else; carries expected, actual, size.

        """
        actual = self.digest()
        if actual != self.expected:
            raise DigestMismatchError(self.expected, actual, self.size)


def next_chain_id(parent: Digest | None, diff_id: Digest) -> Digest:
    """The chain ID of a layer ``diff_id`` on the chain ``parent`` (None: the base layer).

    One step of `chain_ids`: ``diff_id`` itself for a base layer, else
    ``sha256(parent + " " + diff_id)``.
    """
    if parent is None:
        return Digest(diff_id)
    # Digest.from_bytes without its algorithm check: a plan computes ~10^5 of these.
    hexdigest = hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()
    return str.__new__(Digest, "sha256:" + hexdigest)


def chain_ids(diff_ids: Sequence[Digest] | Iterable[Digest]) -> list[Digest]:
    """Chain IDs for an image's layers, bottom first, from their diff IDs.

    OCI image-spec ``config.md`` ("Layer ChainID"): ``ChainID(L0) = DiffID(L0)`` and
    ``ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))``. containerd keys its snapshots
    by chain ID, so this is how one tells whether a layer stack is already unpacked.
    """
    result: list[Digest] = []
    for diff_id in diff_ids:
        result.append(next_chain_id(result[-1] if result else None, diff_id))
    return result
