"""The registry side of the test bed against the real things.

Real `docker-registry` 2.8 in its three flavours, our token server, the fault proxy, and a
small real image built with umoci and pushed and pulled with skopeo and by hand with httpx.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography import x509

from testbed import pki, procs
from testbed.faultproxy import FaultProxy, fault_proxy
from testbed.paths import tool
from testbed.registry import FLAVOURS, Registry, registries

pytestmark = pytest.mark.integration

REPO = "testbed/small"
TAG = "v1"
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.v2+json")
BLOB_SIZE = 2 * 1024 * 1024
#: What skopeo's error says when a registry refuses it.
REFUSED = r"unauthorized|authentication required"


# --- helpers ----------------------------------------------------------------------------


def processes_under(directory: Path) -> list[str]:
    """Live processes whose command line names, or whose working directory is in, `directory`.

    Every bed process runs with its cwd in its work directory, so this finds registries,
    token servers and proxies of one test bed, and nothing of another.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = str((entry / "cwd").readlink())
            if procs.pid_alive(int(entry.name)) and (
                    str(directory) in cmdline or cwd.startswith(str(directory))):
                found.append(f"{entry.name}: {cmdline}")
    return found


def skopeo(*args: str | Path) -> str:
    # Signature policy is not what these tests are about; skip the host's policy file.
    return procs.run([tool("skopeo"), "--insecure-policy", *args])


def transport_flags(registry: Registry, side: str = "", *, anonymous: bool = False,
                    password: str | None = None) -> list[str]:
    """Flags for skopeo to reach `registry`: TLS, trust and credentials (`side`: src/dest/'')."""
    p = f"--{side}-" if side else "--"
    flags = [f"{p}tls-verify={'true' if registry.cert_dir else 'false'}"]
    if registry.cert_dir:
        flags.append(f"{p}cert-dir={registry.cert_dir}")
    if anonymous:
        flags.append(f"{p}no-creds")
    elif registry.username:
        flags.append(f"{p}creds={registry.username}:{password or registry.password}")
    return flags


def challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split a WWW-Authenticate header (RFC 6750 §3) into scheme and parameters."""
    scheme, _, params = header.partition(" ")
    return scheme, dict(re.findall(r'(\w+)="([^"]*)"', params))


def bearer_get(client: httpx.Client, url: str, auth: tuple[str, str] | None,
               headers: dict[str, str] | None = None) -> httpx.Response:
    """GET `url` through the token flow by hand: 401 challenge → token → retry with it."""
    first = client.get(url, headers=headers)
    assert first.status_code == 401
    scheme, params = challenge(first.headers["WWW-Authenticate"])
    assert scheme == "Bearer"
    token = client.get(params["realm"], auth=auth, params={
        "service": params["service"], "scope": params["scope"]})
    token.raise_for_status()
    return client.get(url, headers={**(headers or {}),
                                    "Authorization": f"Bearer {token.json()['token']}"})


@dataclass(frozen=True)
class OciImage:
    """A small image in an OCI layout: its manifest digest and blobs (digest → bytes)."""

    layout: Path
    manifest_digest: str
    blobs: dict[str, int]

    def blob(self, digest: str) -> bytes:
        return (self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


@dataclass(frozen=True)
class Blob:
    repo: str
    digest: str
    data: bytes

    @property
    def path(self) -> str:
        return f"/v2/{self.repo}/blobs/{self.digest}"


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bed_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("registry-bed")
    yield directory
    # Torn down last: every fixture below has stopped its processes by now.
    assert processes_under(directory) == []


@pytest.fixture(scope="module")
def ca(bed_dir: Path) -> pki.CA:
    return pki.CA.create(bed_dir / "pki")


@pytest.fixture(scope="module")
def regs(bed_dir: Path, ca: pki.CA) -> Iterator[dict[str, Registry]]:
    with registries(bed_dir / "registries", ca) as running:
        yield running


@pytest.fixture(scope="module")
def image(bed_dir: Path) -> OciImage:
    """Two layers of real files (and some incompressible bytes), built with umoci."""
    layout, bundle = bed_dir / "oci", bed_dir / "bundle"
    umoci = tool("umoci")
    procs.run([umoci, "init", "--layout", layout])
    procs.run([umoci, "new", "--image", f"{layout}:{TAG}"])
    for files in ((Path("/etc/os-release"), Path("/etc/debian_version")),
                  (Path("/usr/bin/umoci"),)):
        procs.run([umoci, "unpack", "--rootless", "--image", f"{layout}:{TAG}", bundle])
        for f in files:
            shutil.copy(f, bundle / "rootfs" / f.name)
        (bundle / "rootfs" / "noise.bin").write_bytes(os.urandom(256 * 1024))
        procs.run([umoci, "repack", "--image", f"{layout}:{TAG}", bundle])
        shutil.rmtree(bundle)
    index = json.loads((layout / "index.json").read_text())
    [desc] = [m for m in index["manifests"]
              if m["annotations"]["org.opencontainers.image.ref.name"] == TAG]
    manifest = json.loads((layout / "blobs/sha256" / desc["digest"][7:]).read_text())
    blobs = {d["digest"]: d["size"] for d in [manifest["config"], *manifest["layers"]]}
    assert len(manifest["layers"]) == 2
    return OciImage(layout, desc["digest"], blobs)


@pytest.fixture(scope="module")
def pushed(regs: dict[str, Registry], image: OciImage) -> dict[str, str]:
    """The image pushed with skopeo into every flavour: flavour → reference."""
    refs = {}
    for flavour, registry in regs.items():
        refs[flavour] = f"{registry.host}/{REPO}:{TAG}"
        skopeo("copy", "--preserve-digests", *transport_flags(registry, "dest"),
               f"oci:{image.layout}:{TAG}", f"docker://{refs[flavour]}")
    return refs


@pytest.fixture(scope="module")
def blob(regs: dict[str, Registry]) -> Blob:
    """2 MiB of random bytes uploaded monolithically (POST, then PUT ?digest=) to `plain`."""
    data = os.urandom(BLOB_SIZE)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    repo = "testbed/blob"
    with httpx.Client(base_url=regs["plain"].url) as client:
        start = client.post(f"/v2/{repo}/blobs/uploads/")
        assert start.status_code == 202
        # The Location carries the upload state in its query: append, don't replace it.
        done = client.put(f"{start.headers['Location']}&digest={digest}", content=data,
                          headers={"Content-Type": "application/octet-stream"})
        assert done.status_code == 201
    return Blob(repo, digest, data)


@pytest.fixture(scope="module")
def proxy_module(bed_dir: Path, regs: dict[str, Registry]) -> Iterator[FaultProxy]:
    with fault_proxy(bed_dir / "proxy", regs["plain"].url) as proxy:
        yield proxy


@pytest.fixture
def proxy(proxy_module: FaultProxy) -> Iterator[FaultProxy]:
    """The proxy in front of `plain`, with no rules, no rate cap and zeroed counters."""
    proxy_module.reset()
    proxy_module.set_rate(None)
    yield proxy_module
    proxy_module.reset()
    proxy_module.set_rate(None)


@pytest.fixture
def client(proxy: FaultProxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        yield c


# --- registries: push, pull, authentication ---------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_pushed_image_pulls_back_identical(flavour: str, regs: dict[str, Registry],
                                           pushed: dict[str, str], image: OciImage,
                                           tmp_path: Path) -> None:
    registry = regs[flavour]
    raw = skopeo("inspect", "--raw", *transport_flags(registry), f"docker://{pushed[flavour]}")
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == image.manifest_digest
    skopeo("copy", *transport_flags(registry, "src"), f"docker://{pushed[flavour]}",
           f"dir:{tmp_path / 'out'}")
    for digest, size in image.blobs.items():
        pulled = (tmp_path / "out" / digest.removeprefix("sha256:")).read_bytes()
        assert len(pulled) == size
        assert pulled == image.blob(digest)


def test_plain_registry_needs_no_credentials(regs: dict[str, Registry],
                                             pushed: dict[str, str], image: OciImage) -> None:
    registry = regs["plain"]
    assert registry.username is None and registry.password is None
    reply = httpx.get(f"{registry.url}/v2/{REPO}/manifests/{TAG}",
                      headers={"Accept": MANIFEST_TYPES})
    assert reply.status_code == 200
    assert reply.headers["Docker-Content-Digest"] == image.manifest_digest


def test_basic_registry_refuses_anonymous_and_wrong_password(
        regs: dict[str, Registry], pushed: dict[str, str], image: OciImage) -> None:
    registry = regs["basic"]
    assert registry.username and registry.password
    url = f"{registry.url}/v2/{REPO}/manifests/{TAG}"
    anonymous = httpx.get(url, headers={"Accept": MANIFEST_TYPES})
    assert anonymous.status_code == 401
    assert challenge(anonymous.headers["WWW-Authenticate"])[0] == "Basic"
    wrong = httpx.get(url, headers={"Accept": MANIFEST_TYPES},
                      auth=(registry.username, "wrong-password"))
    assert wrong.status_code == 401
    right = httpx.get(url, headers={"Accept": MANIFEST_TYPES},
                      auth=(registry.username, registry.password))
    assert right.status_code == 200
    assert right.headers["Docker-Content-Digest"] == image.manifest_digest
    with pytest.raises(procs.ComponentError, match=REFUSED):
        skopeo("inspect", "--raw", *transport_flags(registry, anonymous=True),
               f"docker://{pushed['basic']}")
    with pytest.raises(procs.ComponentError, match=REFUSED):
        skopeo("inspect", "--raw", *transport_flags(registry, password="wrong-password"),
               f"docker://{pushed['basic']}")


def test_token_registry_refuses_anonymous_pull(regs: dict[str, Registry],
                                               pushed: dict[str, str]) -> None:
    registry = regs["token"]
    url = f"{registry.url}/v2/{REPO}/manifests/{TAG}"
    with httpx.Client(verify=registry.ssl_context()) as client:
        # The token server hands anonymous clients a token (the spec: a smaller grant is not
        # an error) with no access; the registry then refuses the pull.
        reply = bearer_get(client, url, auth=None, headers={"Accept": MANIFEST_TYPES})
    assert reply.status_code == 401
    assert challenge(reply.headers["WWW-Authenticate"])[1]["error"] == "insufficient_scope"
    with pytest.raises(procs.ComponentError, match=REFUSED):
        skopeo("inspect", "--raw", *transport_flags(registry, anonymous=True),
               f"docker://{pushed['token']}")


def test_token_registry_pull_with_credentials_by_hand(regs: dict[str, Registry],
                                                       pushed: dict[str, str],
                                                       image: OciImage) -> None:
    registry = regs["token"]
    assert registry.username and registry.password and registry.token_server
    assert registry.ca_file is not None
    url = f"{registry.url}/v2/{REPO}/manifests/{TAG}"
    with httpx.Client(verify=registry.ssl_context()) as client:
        reply = bearer_get(client, url, auth=(registry.username, registry.password),
                           headers={"Accept": MANIFEST_TYPES})
        assert reply.status_code == 200
        assert "sha256:" + hashlib.sha256(reply.content).hexdigest() == image.manifest_digest
        token = client.get(registry.token_server.realm, auth=(registry.username,
                                                             registry.password), params={
            "service": registry.token_server.service, "scope": f"repository:{REPO}:pull,push"})
    body = token.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["issued_at"])
    # The signature verifies with the key of the x5c certificate, which the bed's CA issued.
    header = jwt.get_unverified_header(body["token"])
    cert = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
    assert cert.issuer == x509.load_pem_x509_certificate(registry.ca_file.read_bytes()).subject
    claims = jwt.decode(body["token"], cert.public_key(), algorithms=["ES256"],  # type: ignore[arg-type]
                        audience=registry.token_server.service,
                        issuer=registry.token_server.issuer)
    assert claims["sub"] == registry.username
    assert claims["access"] == [{"type": "repository", "name": REPO,
                                 "actions": ["pull", "push"]}]
    assert claims["exp"] - claims["iat"] == 300 and claims["nbf"] == claims["iat"]
    assert claims["jti"]


def test_token_server_refuses_wrong_password(regs: dict[str, Registry],
                                             pushed: dict[str, str]) -> None:
    registry = regs["token"]
    assert registry.token_server and registry.username
    reply = httpx.get(registry.token_server.realm, verify=registry.ssl_context(),
                      auth=(registry.username, "wrong-password"),
                      params={"service": registry.token_server.service,
                              "scope": f"repository:{REPO}:pull"})
    assert reply.status_code == 401
    assert "token" not in reply.json()
    with pytest.raises(procs.ComponentError, match=REFUSED):
        skopeo("inspect", "--raw", *transport_flags(registry, password="wrong-password"),
               f"docker://{pushed['token']}")


# --- fault proxy ------------------------------------------------------------------------


def read_until_error(client: httpx.Client, path: str) -> tuple[httpx.Response, int, Exception]:
    """Stream `path`; return the response, the body bytes received and the error that ended it."""
    received = 0
    with client.stream("GET", path) as reply:
        try:
            for chunk in reply.iter_raw():
                received += len(chunk)
        except httpx.TransportError as exc:
            return reply, received, exc
    raise AssertionError(f"{path}: whole body ({received} bytes) received without an error")


def test_proxy_relays_blob_and_counts_its_bytes_exactly(proxy: FaultProxy, client: httpx.Client,
                                                        blob: Blob) -> None:
    reply = client.get(blob.path)
    assert reply.status_code == 200
    assert reply.content == blob.data
    head = client.head(blob.path)
    assert int(head.headers["Content-Length"]) == BLOB_SIZE
    stats = proxy.stats()
    assert stats.bytes_by_path == {blob.path: BLOB_SIZE}
    assert stats.blob_bytes == stats.total_bytes == BLOB_SIZE
    assert stats.count(blob.path, "GET", 200) == 1 and stats.count(blob.path, "HEAD", 200) == 1
    assert stats.total_requests == 2


def test_proxy_429_with_retry_after(proxy: FaultProxy, client: httpx.Client, blob: Blob) -> None:
    proxy.add_fault(r"/blobs/sha256:", "status", status=429, retry_after=7)
    first = client.get(blob.path)
    assert first.status_code == 429
    assert first.headers["Retry-After"] == "7"
    assert first.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    second = client.get(blob.path)
    assert second.status_code == 200 and second.content == blob.data
    stats = proxy.stats()
    assert stats.count(blob.path, "GET", 429) == 1 and stats.count(blob.path, "GET", 200) == 1
    assert stats.blob_bytes == BLOB_SIZE  # the injected error body is not upstream bytes
    assert stats.faults_fired == {"status": 1}


def test_proxy_503_twice_then_success(proxy: FaultProxy, client: httpx.Client,
                                      blob: Blob) -> None:
    proxy.add_fault(re.escape(blob.digest), "status", method="GET", status=503, times=2)
    statuses = [client.get(blob.path).status_code for _ in range(2)]
    retried = client.get(blob.path)
    assert statuses == [503, 503]
    assert retried.status_code == 200
    assert hashlib.sha256(retried.content).hexdigest() == blob.digest.removeprefix("sha256:")
    assert proxy.stats().count(blob.path, "GET", 503) == 2


def test_proxy_resets_connection_after_n_bytes(proxy: FaultProxy, client: httpx.Client,
                                               blob: Blob) -> None:
    proxy.add_fault(r"/blobs/", "reset", method="GET", after_bytes=100_000)
    reply, received, error = read_until_error(client, blob.path)
    assert reply.status_code == 200
    assert int(reply.headers["Content-Length"]) == BLOB_SIZE
    assert received == 100_000
    assert isinstance(error, httpx.ReadError) and "reset" in str(error).lower()
    assert proxy.stats().bytes_by_path == {blob.path: 100_000}
    assert client.get(blob.path).content == blob.data  # one firing only


def test_proxy_truncates_body(proxy: FaultProxy, client: httpx.Client, blob: Blob) -> None:
    proxy.add_fault(r"/blobs/", "truncate", method="GET", after_bytes=300_000)
    reply, received, error = read_until_error(client, blob.path)
    assert int(reply.headers["Content-Length"]) == BLOB_SIZE
    assert received == 300_000
    assert isinstance(error, httpx.RemoteProtocolError)
    assert "expected 2097152" in str(error)
    assert proxy.stats().bytes_by_path == {blob.path: 300_000}


def test_proxy_corrupts_body_same_length(proxy: FaultProxy, client: httpx.Client,
                                         blob: Blob) -> None:
    proxy.add_fault(r"/blobs/", "corrupt", method="GET", after_bytes=12345)
    reply = client.get(blob.path)
    assert reply.status_code == 200
    assert len(reply.content) == BLOB_SIZE == int(reply.headers["Content-Length"])
    assert reply.headers["Docker-Content-Digest"] == blob.digest
    assert "sha256:" + hashlib.sha256(reply.content).hexdigest() != blob.digest
    assert [i for i in range(BLOB_SIZE) if reply.content[i] != blob.data[i]] == [12345]
    assert proxy.stats().blob_bytes == BLOB_SIZE


def test_proxy_answers_a_resume_from_another_byte(proxy: FaultProxy, client: httpx.Client,
                                                  blob: Blob) -> None:
    proxy.add_fault(r"/blobs/", "range", method="GET", after_bytes=1000, ranged=True,
                    times=None)
    whole = client.get(blob.path)  # no Range: the rule does not match
    resumed = client.get(blob.path, headers={"Range": "bytes=5000-"})
    assert whole.status_code == 200 and whole.content == blob.data
    assert resumed.status_code == 206
    assert resumed.headers["Content-Range"] == f"bytes 1000-{BLOB_SIZE - 1}/{BLOB_SIZE}"
    assert resumed.content == blob.data[1000:]
    assert proxy.stats().faults_fired == {"range": 1}


def test_proxy_delays_response(proxy: FaultProxy, client: httpx.Client, blob: Blob) -> None:
    proxy.add_fault(r"/blobs/", "delay", delay_seconds=1.0)
    started = time.monotonic()
    reply = client.get(blob.path)
    assert time.monotonic() - started >= 1.0
    assert reply.content == blob.data


def test_proxy_rate_cap_is_shared_by_all_connections(proxy: FaultProxy, blob: Blob) -> None:
    proxy.set_rate(1_000_000)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        started = time.monotonic()
        assert client.get(blob.path).content == blob.data
        alone = time.monotonic() - started
    assert alone >= 1.5  # 2 MiB at 1 MB/s: about 2.1 s

    # Two downloads at once under a 2 MB/s cap: each alone would take ~1 s, together ~2 s.
    proxy.set_rate(2_000_000)

    def fetch(_: int) -> bytes:
        with httpx.Client(base_url=proxy.url, timeout=30) as c:
            return c.get(blob.path).content

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        bodies = list(pool.map(fetch, range(2)))
    assert time.monotonic() - started >= 1.5
    assert bodies == [blob.data, blob.data]
    assert proxy.stats().blob_bytes == 3 * BLOB_SIZE


def test_proxy_stats_equal_image_blob_sizes_for_a_skopeo_pull(
        proxy: FaultProxy, pushed: dict[str, str], image: OciImage, tmp_path: Path) -> None:
    skopeo("copy", "--src-tls-verify=false", f"docker://{proxy.host}/{REPO}:{TAG}",
           f"dir:{tmp_path / 'out'}")
    stats = proxy.stats()
    blob_counts = {p: n for p, n in stats.bytes_by_path.items() if "/blobs/" in p}
    assert blob_counts == {f"/v2/{REPO}/blobs/{d}": size for d, size in image.blobs.items()}
    assert stats.blob_bytes == sum(image.blobs.values())


def test_proxy_push_goes_through_rewritten_locations(proxy: FaultProxy, client: httpx.Client,
                                                     regs: dict[str, Registry],
                                                     image: OciImage) -> None:
    start = client.post("/v2/testbed/via-proxy/blobs/uploads/")
    assert start.status_code == 202
    assert start.headers["Location"].startswith(f"{proxy.url}/v2/testbed/via-proxy/")
    skopeo("copy", "--dest-tls-verify=false", f"oci:{image.layout}:{TAG}",
           f"docker://{proxy.host}/testbed/via-proxy:{TAG}")
    # Every upload request the registry logged came through the proxy: none followed an
    # upstream Location past it. (Blobs already in `plain` are mounted, not uploaded.)
    through_proxy = sum(r.count for r in proxy.stats().requests
                        if r.path.startswith("/v2/testbed/via-proxy/blobs/uploads/"))
    logged = re.findall(r'"(?:POST|PATCH|PUT) /v2/testbed/via-proxy/blobs/uploads/',
                        regs["plain"].log.read_text())
    assert through_proxy == len(logged) >= 2
    direct = httpx.get(f"{regs['plain'].url}/v2/testbed/via-proxy/manifests/{TAG}",
                       headers={"Accept": MANIFEST_TYPES})
    assert direct.headers["Docker-Content-Digest"] == image.manifest_digest


def test_proxy_control_api_is_never_forwarded(proxy: FaultProxy, client: httpx.Client) -> None:
    assert client.get("/_proxy/nothing-here").status_code == 404
    assert client.post("/_proxy/faults", json={"path_regex": "x", "kind": "boom"}
                       ).status_code == 400
    assert client.put("/_proxy/rate", json={"bytes_per_second": -1}).status_code == 400
    assert proxy.stats().total_requests == 0
    with pytest.raises(ValueError, match="status"):
        proxy.add_fault("x", "status")


def test_proxy_passes_authorization_and_range_to_a_tls_upstream(
        bed_dir: Path, ca: pki.CA, regs: dict[str, Registry], pushed: dict[str, str],
        image: OciImage) -> None:
    registry = regs["token"]
    assert registry.username and registry.password
    layer = next(d for d in image.blobs if image.blobs[d] > 100_000)
    with fault_proxy(bed_dir / "token-proxy", registry.url, upstream_ca=ca.cert) as proxy, \
            httpx.Client(base_url=proxy.url, verify=registry.ssl_context()) as client:
        reply = bearer_get(client, f"{proxy.url}/v2/{REPO}/blobs/{layer}",
                           auth=(registry.username, registry.password),
                           headers={"Range": "bytes=0-99"})
        assert reply.status_code == 206
        assert reply.headers["Content-Range"] == f"bytes 0-99/{image.blobs[layer]}"
        assert reply.content == image.blob(layer)[:100]
        stats = proxy.stats()
    path = f"/v2/{REPO}/blobs/{layer}"
    assert stats.count(path, "GET", 401) == 1 and stats.count(path, "GET", 206) == 1
    # The 401's JSON body is relayed upstream bytes for the path, but not blob content.
    assert stats.blob_bytes == 100 < stats.bytes_by_path[path]


# --- lifecycle --------------------------------------------------------------------------


def test_context_managers_leave_no_process(tmp_path: Path) -> None:
    ca = pki.CA.create(tmp_path / "pki")
    with registries(tmp_path / "regs", ca) as running, \
            fault_proxy(tmp_path / "proxy", running["plain"].url) as proxy:
        assert proxy.process is not None
        pids = [pid for r in running.values() for pid in r.pids] + [proxy.process.pid]
        assert len(pids) == 5  # three registries, one token server, one proxy
        assert all(procs.pid_alive(pid) for pid in pids)
        assert len(processes_under(tmp_path)) == 5
    assert not any(procs.pid_alive(pid) for pid in pids)
    assert processes_under(tmp_path) == []


def test_registries_stops_what_started_when_a_later_one_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_free_port = procs.free_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([real_free_port(), taken.getsockname()[1]])
        # The second registry gets a port that is already in use and cannot start.
        monkeypatch.setattr(procs, "free_port", lambda: next(ports))
        with pytest.raises(procs.ComponentError, match="address already in use"), \
                registries(tmp_path, None, ("plain", "basic")):
            pass
    assert processes_under(tmp_path) == []
    assert (tmp_path / "plain" / "registry.log").exists()
