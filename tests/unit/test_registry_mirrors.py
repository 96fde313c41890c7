"""containerd's ``hosts.toml`` semantics (docs/hosts.md): parsing, lookup, and the transport.

The transport is exercised with real HTTP servers on loopback (aiohttp) that record what
they are asked; the "upstream" is a loopback port nothing listens on.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from layercache.oci.reference import parse_reference
from layercache.registry.client import RegistryClient, RegistryOptions
from layercache.registry.mirrors import (
    HostsConfigError,
    HostsDirectory,
    MirrorTransport,
    parse_hosts_toml,
)

BLOB = "sha256:" + "a" * 64


def test_hosts_toml_in_file_order_with_containerds_defaults(tmp_path: Path) -> None:
    config = parse_hosts_toml('''
server = "https://registry-1.docker.io"
ca = "server.pem"

[host."https://mirror.example/base"]
  capabilities = ["pull"]
  ca = ["a.pem", "/etc/b.pem"]
  [host."https://mirror.example/base".header]
    x-one = ["1", "2"]
[host."http://10-mirror.example:5000"]
[host."https://raw.example/v2/upstream/extra"]
  capabilities = ["pull", "resolve"]
  override_path = true
  skip_verify = true
''', tmp_path)
    assert [str(h.url) for h in config.hosts] == [
        "https://mirror.example/base/v2", "http://10-mirror.example:5000/v2",
        "https://raw.example/v2/upstream/extra"]
    first, second, third = config.hosts
    assert first.capabilities == {"pull"} and second.capabilities == {"pull", "resolve", "push"}
    assert first.ca == (tmp_path / "a.pem", Path("/etc/b.pem"))
    assert first.headers == (("x-one", "1"), ("x-one", "2"))
    assert third.skip_verify and not first.skip_verify
    assert config.server is not None
    assert str(config.server.url) == "https://registry-1.docker.io/v2"
    assert config.server.ca == (tmp_path / "server.pem",)


@pytest.mark.parametrize(("text", "field"), [
    ("server = 5", "server"),
    ('[host."ftp://x"]', r"not an http\(s\) URL"),
    ('[host."https://x"]\ncapabilities = ["pull", "fly"]', "unknown capabilities"),
    ('[host."https://x"]\nskip_verify = "yes"', "skip_verify"),
    ("server = [", "not TOML"),
])
def test_bad_hosts_toml_names_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(HostsConfigError, match=rf"^/x/hosts.toml: .*{field}"):
        parse_hosts_toml(text, tmp_path, "/x/hosts.toml")


def test_host_directory_lookup_order(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    (second / "reg.example:5000").mkdir(parents=True)
    (first / "_default").mkdir(parents=True)
    hosts = HostsDirectory(f"{first}:{second}")
    # host:port in any root wins over _default; host_port_ over host:port.
    assert hosts.host_directory("reg.example:5000") == second / "reg.example:5000"
    (first / "reg.example_5000_").mkdir()
    assert hosts.host_directory("reg.example:5000") == first / "reg.example_5000_"
    assert hosts.host_directory("other.example") == first / "_default"
    assert HostsDirectory("").roots == ()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def mirrors() -> AsyncIterator[tuple[list[web.Request], str, str]]:
    """Two loopback registries: ``empty`` answers 404 to everything, ``full`` has the blob."""
    seen: list[web.Request] = []

    async def empty(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(status=404)

    async def full(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(body=b"blob-bytes")

    runners, urls = [], []
    for handler in (empty, full):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        urls.append(f"http://127.0.0.1:{port}")
    yield seen, urls[0], urls[1]
    for runner in runners:
        await runner.cleanup()


async def test_fetch_goes_through_mirrors_in_order_and_never_takes_credentials(
    tmp_path: Path, mirrors: tuple[list[web.Request], str, str]
) -> None:
    seen, empty, full = mirrors
    upstream = f"reg.example:{_dead_port()}"  # nothing listens: the node has no egress
    directory = tmp_path / upstream
    directory.mkdir()
    (directory / "hosts.toml").write_text(f'''
server = "https://{upstream}"
[host."{empty}/base"]
  capabilities = ["pull"]
  override_path = true
[host."{full}"]
  capabilities = ["pull"]
  [host."{full}".header]
    x-node = "n1"
''')
    hosts = HostsDirectory([tmp_path])
    client = RegistryClient(registries={upstream: RegistryOptions()},
                            transport_factory=lambda tls: MirrorTransport(hosts, tls))
    reference = parse_reference(f"{upstream}/team/app:1")
    async with client, client.stream("GET", reference, f"/v2/team/app/blobs/{BLOB}",
                             {"Authorization": "Basic c2VjcmV0"}) as response:
        body = await response.aread()
    assert response.status_code == 200 and body == b"blob-bytes"
    first, second = seen
    # override_path: the URL path is the API root as written (no /v2 added).
    assert first.path == f"/base/team/app/blobs/{BLOB}"
    assert second.path == f"/v2/team/app/blobs/{BLOB}"
    for request in seen:
        assert request.query["ns"] == upstream
        assert "Authorization" not in request.headers
    assert second.headers["x-node"] == "n1"


async def test_a_tag_is_resolved_only_by_hosts_trusted_to_resolve(
    tmp_path: Path, mirrors: tuple[list[web.Request], str, str]
) -> None:
    seen, _, full = mirrors
    upstream = f"127.0.0.1:{_dead_port()}"
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text(
        f'[host."{full}"]\n  capabilities = ["pull"]\n')
    transport = MirrorTransport(HostsDirectory([tmp_path]), ssl.create_default_context())
    async with httpx.AsyncClient(transport=transport) as client:
        # By digest: the pull-only mirror serves it. By tag: only the registry may answer,
        # and it does not.
        response = await client.get(f"http://{upstream}/v2/app/manifests/{BLOB}")
        assert response.status_code == 200
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://{upstream}/v2/app/manifests/latest")
        # A token realm on a registry host is not an API path: no mirror for it.
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://{upstream}/v2/auth?scope=x")
    assert [r.path for r in seen] == [f"/v2/app/manifests/{BLOB}"]
