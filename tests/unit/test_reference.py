"""Image reference parsing and normalisation (distribution/reference grammar), pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layercache.oci.digest import Digest
from layercache.oci.reference import InvalidReferenceError, Reference, parse_reference

D = "sha256:" + "7cc4b5aefd1d0cadf8d97d4350462ba51c694ebca145b08d7d41b41acc8db5aa"
D512 = "sha512:" + "ab" * 64

# input, registry, repository, tag, digest, str(), familiar()
# fmt: off
VALID = [
    ("ubuntu", "docker.io", "library/ubuntu", "latest", None,
     "docker.io/library/ubuntu:latest", "ubuntu:latest"),
    ("docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None,
     "docker.io/library/ubuntu:latest", "ubuntu:latest"),
    ("index.docker.io/library/ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None,
     "docker.io/library/ubuntu:22.04", "ubuntu:22.04"),
    ("registry-1.docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None,
     "docker.io/library/ubuntu:latest", "ubuntu:latest"),
    ("Index.Docker.IO/bitnami/redis", "docker.io", "bitnami/redis", "latest", None,
     "docker.io/bitnami/redis:latest", "bitnami/redis:latest"),
    ("dmcgowan/myapp", "docker.io", "dmcgowan/myapp", "latest", None,
     "docker.io/dmcgowan/myapp:latest", "dmcgowan/myapp:latest"),
    ("library/foo/bar", "docker.io", "library/foo/bar", "latest", None,
     "docker.io/library/foo/bar:latest", "library/foo/bar:latest"),
    ("localhost/foo", "localhost", "foo", "latest", None,
     "localhost/foo:latest", "localhost/foo:latest"),
    ("localhost", "docker.io", "library/localhost", "latest", None,
     "docker.io/library/localhost:latest", "localhost:latest"),
    ("localhost:5000/foo", "localhost:5000", "foo", "latest", None,
     "localhost:5000/foo:latest", "localhost:5000/foo:latest"),
    ("foo.com/bar", "foo.com", "bar", "latest", None, "foo.com/bar:latest", "foo.com/bar:latest"),
    ("Foo.COM/bar", "foo.com", "bar", "latest", None, "foo.com/bar:latest", "foo.com/bar:latest"),
    (f"foo:5000/bar@{D}", "foo:5000", "bar", None, D, f"foo:5000/bar@{D}", f"foo:5000/bar@{D}"),
    (f"busybox:latest@{D}", "docker.io", "library/busybox", "latest", D,
     f"docker.io/library/busybox:latest@{D}", f"busybox:latest@{D}"),
    (f"busybox@{D512}", "docker.io", "library/busybox", None, D512,
     f"docker.io/library/busybox@{D512}", f"busybox@{D512}"),
    ("ubuntu:Jammy_2204", "docker.io", "library/ubuntu", "Jammy_2204", None,
     "docker.io/library/ubuntu:Jammy_2204", "ubuntu:Jammy_2204"),
    ("ubuntu:_x", "docker.io", "library/ubuntu", "_x", None,
     "docker.io/library/ubuntu:_x", "ubuntu:_x"),
    ("foo:5000", "docker.io", "library/foo", "5000", None,
     "docker.io/library/foo:5000", "foo:5000"),
    ("[::1]:5000/x", "[::1]:5000", "x", "latest", None, "[::1]:5000/x:latest",
     "[::1]:5000/x:latest"),
    ("[0:0:0:0:0:0:0:1]/x:v1", "[::1]", "x", "v1", None, "[::1]/x:v1", "[::1]/x:v1"),
    ("[FC00::1]:5000/docker/docker", "[fc00::1]:5000", "docker/docker", "latest", None,
     "[fc00::1]:5000/docker/docker:latest", "[fc00::1]:5000/docker/docker:latest"),
    ("127.0.0.1:05000/a/b", "127.0.0.1:5000", "a/b", "latest", None,
     "127.0.0.1:5000/a/b:latest", "127.0.0.1:5000/a/b:latest"),
    ("test_com/foo", "docker.io", "test_com/foo", "latest", None,
     "docker.io/test_com/foo:latest", "test_com/foo:latest"),
    ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo", "latest", None,
     "xn--n3h.com:18080/foo:latest", "xn--n3h.com:18080/foo:latest"),
    ("docker---rules/dock__er.x", "docker.io", "docker---rules/dock__er.x", "latest", None,
     "docker.io/docker---rules/dock__er.x:latest", "docker---rules/dock__er.x:latest"),
    ("docker.io/" + "a" * 64, "docker.io", "library/" + "a" * 64, "latest", None,
     "docker.io/library/" + "a" * 64 + ":latest", "a" * 64 + ":latest"),
    ("ghcr.io/org/team/app:1.2.3-rc.1", "ghcr.io", "org/team/app", "1.2.3-rc.1", None,
     "ghcr.io/org/team/app:1.2.3-rc.1", "ghcr.io/org/team/app:1.2.3-rc.1"),
    ("x:" + "t" * 128, "docker.io", "library/x", "t" * 128, None,
     "docker.io/library/x:" + "t" * 128, "x:" + "t" * 128),
    ("sha256:" + "a" * 64, "docker.io", "library/sha256", "a" * 64, None,
     "docker.io/library/sha256:" + "a" * 64, "sha256:" + "a" * 64),
    ("docker.io/localhost/foo", "docker.io", "localhost/foo", "latest", None,
     "docker.io/localhost/foo:latest", "docker.io/localhost/foo:latest"),
    ("docker.io/0.0/x", "docker.io", "0.0/x", "latest", None,
     "docker.io/0.0/x:latest", "docker.io/0.0/x:latest"),
]
# fmt: on

# input, part, message fragment
INVALID = [
    ("", "reference", "empty"),
    (" ubuntu", "reference", "whitespace"),
    ("Foo/bar", "repository", "'Foo' must be lower-case"),
    ("FOO", "repository", "'FOO' must be lower-case"),
    ("docker/Docker", "repository", "'Docker' must be lower-case"),
    ("docker.io/docker/Docker:tag", "repository", "'Docker' must be lower-case"),
    ("ubuntu:", "tag", "empty after ':'"),
    ("ubuntu@", "digest", "empty after '@'"),
    ("ubuntu:-x", "tag", "must start with"),
    ("ubuntu:.x", "tag", "must start with"),
    ("ubuntu:\u00e9", "tag", "must start with"),
    ("x:" + "t" * 129, "tag", "129 characters"),
    ("ubuntu@md5:" + "a" * 32, "digest", "unsupported algorithm 'md5'"),
    ("ubuntu@sha256:abc", "digest", "exactly 64"),
    ("ubuntu@sha256:" + "A" * 64, "digest", "lower-case hex"),
    ("ubuntu@" + "a" * 64, "digest", "missing ':'"),
    (f"ubuntu@{D}@{D}", "digest", "encoded part"),
    ("[::1]:5000", "repository", "'[::1]'"),
    ("fc00::1:5000/debian", "registry", "in brackets"),
    ("[fe80::1%eth0]:5000/x", "registry", "IPv6"),
    ("[::1:5000/x", "registry", "IPv6"),
    ("[1::2::3]/x", "registry", "[1::2::3]"),
    ("foo:0/x", "port", "outside 1-65535"),
    ("foo:65536/x", "port", "outside 1-65535"),
    ("foo:abc/x", "port", "digits"),
    ("-docker.io/x", "registry", "'-docker.io'"),
    ("foo..com/x", "registry", "'foo..com'"),
    ("docker///docker", "repository", "empty path component"),
    ("a/b/", "repository", "empty path component"),
    ("foo.com/", "repository", "empty path component"),
    ("-docker", "repository", "'-docker'"),
    ("dock..er/docker", "registry", "'dock..er'"),
    ("dock_-er/docker", "repository", "'dock_-er'"),
    ("____/____", "repository", "'____'"),
    ("https://github.com/docker/docker", "port", "digits"),
    ("a" * 64, "repository", "image ID"),
    ("x/" + "a" * 254, "repository", "256 characters"),
]


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "canonical", "familiar"), VALID
)
def test_parse(
    text: str,
    registry: str,
    repository: str,
    tag: str | None,
    digest: str | None,
    canonical: str,
    familiar: str,
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert str(ref) == canonical
    assert ref.familiar() == familiar
    assert parse_reference(canonical) == ref
    assert parse_reference(familiar) == ref
    if digest is not None:
        assert isinstance(ref.digest, Digest)


@pytest.mark.parametrize(("text", "part", "fragment"), INVALID)
def test_invalid(text: str, part: str, fragment: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference(text)
    error = info.value
    assert error.part == part
    assert fragment in error.reason
    assert repr(text) in str(error)
    assert isinstance(error, ValueError)


def test_table_is_big_enough() -> None:
    assert len(VALID) + len(INVALID) >= 30


def test_api_host_and_manifest_reference() -> None:
    hub = parse_reference(f"ubuntu:22.04@{D}")
    assert hub.api_host == "registry-1.docker.io"
    assert hub.manifest_reference == D  # the digest wins over the tag
    assert hub.name == "docker.io/library/ubuntu"
    local = parse_reference("localhost:5000/foo:1")
    assert local.api_host == "localhost:5000"
    assert local.manifest_reference == "1"


def test_with_digest() -> None:
    ref = parse_reference("ghcr.io/a/b:1").with_digest(Digest(D))
    assert str(ref) == f"ghcr.io/a/b:1@{D}"
    assert ref.manifest_reference == D


def test_frozen_and_hashable() -> None:
    ref = parse_reference("ubuntu")
    assert {ref: 1}[parse_reference("docker.io/library/ubuntu:latest")] == 1
    with pytest.raises(AttributeError):
        ref.tag = "x"  # type: ignore[misc]


# Generators following the grammar, to check parse → str → parse is a fixed point.
_alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
_separator = st.sampled_from([".", "_", "__", "-", "--"])
_component = st.builds(
    lambda first, rest: first + "".join(s + a for s, a in rest),
    _alnum,
    st.lists(st.tuples(_separator, _alnum), max_size=2),
)
_lower = "abcdefghijklmnopqrstuvwxyz0123456789"
_label = st.builds(
    lambda a, mid, b: a + mid + b if mid or b else a,
    st.sampled_from(_lower + "ABC"),
    st.text(_lower + "-", max_size=6),
    st.text(_lower, min_size=0, max_size=1),
).filter(lambda label: not label.endswith("-"))
_host = st.one_of(
    st.just("localhost"),
    st.sampled_from(["docker.io", "index.docker.io", "registry-1.docker.io"]),
    st.builds(lambda a, b: f"{a}.{b}", _label, _label),
    st.sampled_from(["[::1]", "[fc00::1]", "[2001:db8::ff]", "127.0.0.1"]),
)
_port = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
_tag = st.builds(
    lambda a, rest: a + rest,
    st.sampled_from(_lower + "ABZ_"),
    st.text(_lower + "ABZ_.-", max_size=20),
)
_digest = st.binary(max_size=16).map(lambda b: str(Digest.from_bytes(b)))


@st.composite
def references(draw: st.DrawFn) -> str:
    components = draw(st.lists(_component, min_size=1, max_size=3))
    path = "/".join(components)
    text = path
    # Without a host, a first component with '.' (or "localhost") would itself be the host.
    ambiguous = len(components) > 1 and ("." in components[0] or components[0] == "localhost")
    if ambiguous or draw(st.booleans()):
        text = draw(_host) + draw(_port) + "/" + path
    if draw(st.booleans()):
        text += ":" + draw(_tag)
    if draw(st.booleans()):
        text += "@" + draw(_digest)
    return text


@given(references())
def test_round_trip(text: str) -> None:
    ref = parse_reference(text)
    again = parse_reference(str(ref))
    assert again == ref
    assert str(again) == str(ref)
    assert parse_reference(ref.familiar()) == ref


@given(st.text(max_size=40))
def test_arbitrary_text_parses_or_raises_our_error(text: str) -> None:
    try:
        ref = parse_reference(text)
    except InvalidReferenceError:
        return
    assert isinstance(ref, Reference)
    assert parse_reference(str(ref)) == ref
