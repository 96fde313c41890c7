"""Platform normalisation, compatibility order and index selection (containerd rules), pure."""

from __future__ import annotations

from typing import Any

import pytest

from layercache.oci.platform import (
    InvalidPlatformError,
    Platform,
    PlatformNotFoundError,
    is_attestation,
    parse_platform,
    select_manifest,
)

# (input, normalised str) — containerd platforms database.go normalizeArch / normalizeOS.
NORMALISE = [
    ("linux/amd64", "linux/amd64"),
    ("linux/x86_64", "linux/amd64"),
    ("linux/x86-64", "linux/amd64"),
    ("Linux/AMD64", "linux/amd64"),
    ("linux/amd64/v1", "linux/amd64"),
    ("linux/amd64/v3", "linux/amd64/v3"),
    ("linux/aarch64", "linux/arm64"),
    ("linux/arm64/v8", "linux/arm64"),
    ("linux/arm64/8", "linux/arm64"),
    ("linux/arm64/v8.0", "linux/arm64"),
    ("linux/arm64/v8.2", "linux/arm64/v8.2"),
    ("linux/arm64/9", "linux/arm64/v9"),
    ("linux/arm64/v9.0", "linux/arm64/v9"),
    ("linux/armhf", "linux/arm/v7"),
    ("linux/armel", "linux/arm/v6"),
    ("linux/arm", "linux/arm/v7"),
    ("linux/arm/7", "linux/arm/v7"),
    ("linux/arm/6", "linux/arm/v6"),
    ("linux/arm/v5", "linux/arm/v5"),
    ("linux/i386", "linux/386"),
    ("linux/386", "linux/386"),
    ("macos/arm64", "darwin/arm64"),
    ("linux/riscv64", "linux/riscv64"),
    ("linux/s390x", "linux/s390x"),
    ("unknown/unknown", "unknown/unknown"),
]


@pytest.mark.parametrize(("text", "expected"), NORMALISE)
def test_normalise(text: str, expected: str) -> None:
    platform = parse_platform(text)
    assert str(platform) == expected
    assert parse_platform(expected) == platform


def test_constructor_normalises_and_equals() -> None:
    assert Platform("linux", "x86_64") == Platform("linux", "amd64")
    assert Platform("linux", "arm64", "v8") == Platform("linux", "arm64")
    assert Platform("linux", "arm") == Platform("linux", "armhf")
    assert len({Platform("linux", "aarch64"), Platform("linux", "arm64", "8")}) == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "linux",
        "amd64",
        "linux/",
        "/amd64",
        "linux//v7",
        "linux/amd64/v3/x",
        "linux/amd 64",
        "windows(10.0.17763)/amd64",
        "linux/*",
    ],
)
def test_parse_errors(text: str) -> None:
    with pytest.raises(InvalidPlatformError) as info:
        parse_platform(text)
    assert repr(text) in str(info.value)


def test_constructor_errors() -> None:
    with pytest.raises(InvalidPlatformError, match="os"):
        Platform("", "amd64")
    with pytest.raises(InvalidPlatformError, match="architecture"):
        Platform("linux", "")
    with pytest.raises(InvalidPlatformError, match="variant"):
        Platform("linux", "arm", "v 7")


# containerd compare_test.go TestOnly: what each platform runs, best first. The arm/v9 after
# arm64/v9 is containerd's own arithmetic (arm64 v9 → arm "v9"), mirrored, not invented.
COMPATIBLE = [
    ("linux/amd64", "linux/amd64 linux/386"),
    ("linux/amd64/v3", "linux/amd64/v3 linux/amd64/v2 linux/amd64 linux/386"),
    ("linux/386", "linux/386"),
    ("linux/arm/v8", "linux/arm/v8 linux/arm/v7 linux/arm/v6 linux/arm/v5"),
    ("linux/arm/v7", "linux/arm/v7 linux/arm/v6 linux/arm/v5"),
    ("linux/arm/v5", "linux/arm/v5"),
    ("linux/arm/v4", "linux/arm/v4"),
    ("linux/arm64", "linux/arm64 linux/arm/v8 linux/arm/v7 linux/arm/v6 linux/arm/v5"),
    (
        "linux/arm64/v8.1",
        "linux/arm64/v8.1 linux/arm64 linux/arm/v8 linux/arm/v7 linux/arm/v6 linux/arm/v5",
    ),
    (
        "linux/arm64/v9",
        "linux/arm64/v9 linux/arm64/v8.5 linux/arm64/v8.4 linux/arm64/v8.3 linux/arm64/v8.2 "
        "linux/arm64/v8.1 linux/arm64 linux/arm/v9 linux/arm/v8 linux/arm/v7 linux/arm/v6 "
        "linux/arm/v5",
    ),
]


@pytest.mark.parametrize(("text", "expected"), COMPATIBLE)
def test_compatible_order(text: str, expected: str) -> None:
    assert [str(p) for p in parse_platform(text).compatible()] == expected.split()


def entry(platform: str | None, digest: str, **annotations: str) -> dict[str, Any]:
    result: dict[str, Any] = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest,
        "size": 1000,
    }
    if platform is not None:
        os_name, arch, *variant = platform.split("/")
        result["platform"] = {"os": os_name, "architecture": arch}
        if variant:
            result["platform"]["variant"] = variant[0]
    if annotations:
        result["annotations"] = dict(annotations)
    return result


ATTEST = {"vnd.docker.reference.type": "attestation-manifest"}
BUILDX_INDEX = [
    entry("linux/amd64", "amd"),
    entry("linux/arm64/v8", "arm64"),
    entry("linux/arm/v7", "armv7"),
    entry("linux/arm/v6", "armv6"),
    entry("unknown/unknown", "att-amd", **ATTEST),
    entry("unknown/unknown", "att-arm64", **ATTEST),
]

# (index, wanted, chosen digest)
SELECT = [
    (BUILDX_INDEX, "linux/amd64", "amd"),
    (BUILDX_INDEX, "linux/x86_64", "amd"),
    (BUILDX_INDEX, "linux/arm64", "arm64"),
    (BUILDX_INDEX, "linux/aarch64", "arm64"),
    (BUILDX_INDEX, "linux/arm/v7", "armv7"),
    (BUILDX_INDEX, "linux/arm/v6", "armv6"),
    (BUILDX_INDEX, "linux/arm/v8", "armv7"),  # newer arm runs the best older variant
    # exact variant beats a compatible one, wherever it sits in the index
    ([entry("linux/amd64", "v1"), entry("linux/amd64/v3", "v3")], "linux/amd64/v3", "v3"),
    ([entry("linux/amd64/v2", "v2"), entry("linux/amd64", "v1")], "linux/amd64/v3", "v2"),
    ([entry("linux/amd64/v3", "v3"), entry("linux/amd64", "v1")], "linux/amd64", "v1"),
    ([entry("linux/386", "x86"), entry("linux/arm64", "arm")], "linux/amd64", "x86"),
    ([entry("linux/arm/v7", "arm"), entry("linux/arm64/v8", "a64")], "linux/arm64", "a64"),
    ([entry("linux/arm/v7", "arm")], "linux/arm64", "arm"),
    # first of equals wins, as containerd's stable sort does
    ([entry("linux/amd64", "first"), entry("linux/amd64", "second")], "linux/amd64", "first"),
    # attestation by annotation alone, even with a real-looking platform
    ([entry("linux/amd64", "att", **ATTEST), entry("linux/amd64", "img")], "linux/amd64", "img"),
    # no platform / malformed / os.features are skipped, not fatal
    (
        [
            entry(None, "nop"),
            {"digest": "bad", "platform": {"os": "linux"}},
            entry("linux/amd64", "img"),
        ],
        "linux/amd64",
        "img",
    ),
]


@pytest.mark.parametrize(("index", "wanted", "chosen"), SELECT)
def test_select(index: list[dict[str, Any]], wanted: str, chosen: str) -> None:
    assert select_manifest(index, parse_platform(wanted))["digest"] == chosen


def test_select_skips_os_features() -> None:
    featured = entry("linux/amd64", "feat")
    featured["platform"]["os.features"] = ["sse4"]
    index = [featured, entry("linux/386", "x86")]
    assert select_manifest(index, parse_platform("linux/amd64"))["digest"] == "x86"


def test_select_never_returns_attestation_even_for_unknown() -> None:
    with pytest.raises(PlatformNotFoundError):
        select_manifest(BUILDX_INDEX[4:], Platform("unknown", "unknown"))


def test_not_found_lists_offers() -> None:
    with pytest.raises(PlatformNotFoundError) as info:
        select_manifest([*BUILDX_INDEX, entry(None, "x")], parse_platform("linux/riscv64"))
    error = info.value
    assert error.wanted == Platform("linux", "riscv64")
    assert error.offered == (
        "linux/amd64",
        "linux/arm64",
        "linux/arm/v7",
        "linux/arm/v6",
        "(no platform)",
    )
    assert error.attestations == 2
    message = str(error)
    assert "linux/riscv64" in message
    assert "linux/arm/v6" in message
    assert "2 attestation entries ignored" in message
    assert not isinstance(error, ValueError)


def test_not_found_empty_index() -> None:
    with pytest.raises(PlatformNotFoundError, match="nothing runnable"):
        select_manifest([], parse_platform("linux/amd64"))


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (entry("unknown/unknown", "a"), True),
        (entry("linux/amd64", "a", **ATTEST), True),
        (entry("linux/amd64", "a"), False),
        (entry("linux/amd64", "a", **{"vnd.docker.reference.type": "other"}), False),
        (entry(None, "a"), False),
    ],
)
def test_is_attestation(item: dict[str, Any], expected: bool) -> None:
    assert is_attestation(item) is expected
