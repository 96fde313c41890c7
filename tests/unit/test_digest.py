"""Digest parsing, streaming verification and chain IDs (pure)."""

from __future__ import annotations

import hashlib
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layercache.oci.digest import (
    Digest,
    DigestMismatchError,
    DigestVerifier,
    InvalidDigestError,
    UnsupportedDigestAlgorithmError,
    chain_ids,
    parse_digest,
)

HEX64 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"  # sha256("foo")
HEX128 = hashlib.sha512(b"foo").hexdigest()


@pytest.mark.parametrize(
    "text",
    [f"sha256:{HEX64}", f"sha512:{HEX128}"],
)
def test_valid(text: str) -> None:
    digest = parse_digest(text)
    assert digest == text
    assert isinstance(digest, str)
    assert digest.algorithm == text.split(":")[0]
    assert digest.encoded == text.split(":")[1]
    assert Digest(digest) is digest


@pytest.mark.parametrize(
    ("text", "error", "fragment"),
    [
        ("", InvalidDigestError, "empty"),
        (HEX64, InvalidDigestError, "missing ':'"),
        (f"SHA256:{HEX64}", InvalidDigestError, "algorithm 'SHA256'"),
        ("sha256:", InvalidDigestError, "empty encoded"),
        (f"sha256:{HEX64[:-1]}", InvalidDigestError, "exactly 64"),
        (f"sha256:{HEX64}0", InvalidDigestError, "exactly 64"),
        (f"sha256:{HEX64.upper()}", InvalidDigestError, "lower-case hex"),
        (f"sha256:{HEX64[:-1]}g", InvalidDigestError, "lower-case hex"),
        (f"sha512:{HEX64}", InvalidDigestError, "exactly 128"),
        (f"sha256:{HEX64[:-1]}/", InvalidDigestError, "encoded part"),
        (f"sha384:{'a' * 96}", UnsupportedDigestAlgorithmError, "'sha384'"),
        (f"blake3:{'a' * 64}", UnsupportedDigestAlgorithmError, "'blake3'"),
        (f"sha256+b64u:{'a' * 43}", UnsupportedDigestAlgorithmError, "'sha256+b64u'"),
        (f" sha256:{HEX64}", InvalidDigestError, "algorithm"),
    ],
)
def test_invalid(text: str, error: type[InvalidDigestError], fragment: str) -> None:
    with pytest.raises(error) as info:
        Digest(text)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unsupported_names_algorithm() -> None:
    with pytest.raises(UnsupportedDigestAlgorithmError) as info:
        Digest(f"sha384:{'a' * 96}")
    assert info.value.algorithm == "sha384"


def test_not_a_string() -> None:
    with pytest.raises(InvalidDigestError):
        Digest(42)  # type: ignore[arg-type]


def test_from_bytes_and_short() -> None:
    digest = Digest.from_bytes(b"foo")
    assert digest == f"sha256:{HEX64}"
    assert digest.short == f"sha256:{HEX64[:12]}"
    assert Digest.from_bytes(b"foo", "sha512").encoded == hashlib.sha512(b"foo").hexdigest()
    with pytest.raises(UnsupportedDigestAlgorithmError):
        Digest.from_bytes(b"foo", "md5")


def test_pickle_and_dict_key() -> None:
    digest = Digest.from_bytes(b"foo")
    assert pickle.loads(pickle.dumps(digest)) == digest  # noqa: S301  # our own bytes
    assert {digest: 1}[f"sha256:{HEX64}"] == 1


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_verifier_streams(algorithm: str) -> None:
    data = bytes(range(256)) * 1000
    verifier = DigestVerifier(Digest.from_bytes(data, algorithm))
    for start in range(0, len(data), 4096):
        verifier.update(memoryview(data)[start : start + 4096])
    verifier.verify()
    assert verifier.size == len(data)


def test_verifier_mismatch_names_both() -> None:
    expected = Digest.from_bytes(b"expected")
    verifier = DigestVerifier(expected)
    verifier.update(b"trunc")
    with pytest.raises(DigestMismatchError) as info:
        verifier.verify()
    error = info.value
    assert error.expected == expected
    assert error.actual == Digest.from_bytes(b"trunc")
    assert error.size == 5
    assert str(expected) in str(error)
    assert str(error.actual) in str(error)
    assert not isinstance(error, ValueError)


def test_verifier_rejects_bad_expected() -> None:
    with pytest.raises(InvalidDigestError):
        DigestVerifier("sha256:nope")  # type: ignore[arg-type]


@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=512))
def test_verifier_chunking_irrelevant(data: bytes, chunk: int) -> None:
    verifier = DigestVerifier(Digest.from_bytes(data))
    for start in range(0, len(data), chunk):
        verifier.update(data[start : start + chunk])
    verifier.verify()


def test_chain_ids() -> None:
    # OCI image-spec config.md: ChainID(L0) = DiffID(L0);
    # ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)).
    d0, d1, d2 = (Digest.from_bytes(x) for x in (b"a", b"b", b"c"))
    c1 = "sha256:" + hashlib.sha256(f"{d0} {d1}".encode()).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {d2}".encode()).hexdigest()
    assert chain_ids([d0, d1, d2]) == [d0, c1, c2]
    assert chain_ids([]) == []


# Diff IDs from the OCI image-spec's config example; the chain IDs were computed outside
# Python, with coreutils: printf '%s %s' "$parent" "$diff" | sha256sum.
_SPEC_DIFF_IDS = (
    "sha256:c6f988f4874bb0add23a778f753c65efe992244e148a1d2ec2a8b664fb66bbd1",
    "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef",
    "sha256:13f53e08df5a220ab6d13c58b2bf83a59cbdc2e04d0a3f041ddf4b0ba4112d49",
)


@pytest.mark.parametrize(("diff_ids", "expected"), [
    (_SPEC_DIFF_IDS[:1], _SPEC_DIFF_IDS[:1]),
    (_SPEC_DIFF_IDS[:2], (
        _SPEC_DIFF_IDS[0],
        "sha256:c3191d32a37d7159b2e30830937d2e30268ad6c375a773a8994911a3aba9b93f")),
    (_SPEC_DIFF_IDS, (
        _SPEC_DIFF_IDS[0],
        "sha256:c3191d32a37d7159b2e30830937d2e30268ad6c375a773a8994911a3aba9b93f",
        "sha256:f295fb504ece04334c2571429c89e50e23f359e101ea9c3831a6993bb7d2301f")),
])
def test_chain_ids_table(diff_ids: tuple[str, ...], expected: tuple[str, ...]) -> None:
    # Each prefix's chain ID depends only on that prefix: a shared base has one chain ID.
    assert chain_ids(Digest(d) for d in diff_ids) == list(expected)
