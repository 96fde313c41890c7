"""Token flow, token cache, auth errors and manifest fetch rules. In-memory transport."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from layercache.oci.digest import Digest, DigestMismatchError
from layercache.oci.mediatypes import OCI_MANIFEST
from layercache.oci.reference import parse_reference
from layercache.registry.auth import Authenticator, parse_token_response
from layercache.registry.client import RegistryClient, RegistryOptions
from layercache.registry.credentials import (
    DockerConfig,
    Keyring,
    first_accepted,
    selected_keyring,
)
from layercache.registry.errors import (
    AccessDeniedError,
    AuthenticationError,
    ManifestNotFoundError,
    RegistryConfigError,
    UnsupportedCredentialsError,
)
from layercache.registry.fetch import get_manifest, head_manifest
from layercache.registry.retry import RetryPolicy

HOST = "reg.example"
REALM = "https://auth.example/token"
REF = parse_reference(f"{HOST}/family/base:v1")
PASSWORD = "hunter2-very-secret"
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + "1" * 64,
            "size": 10,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": "sha256:" + "2" * 64,
                "size": 20,
            }
        ],
    }
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
CHALLENGE = f'Bearer realm="{REALM}",service="reg",scope="repository:family/base:pull"'


def keyring(password: str = PASSWORD) -> Keyring:
    return Keyring(
        [
            DockerConfig.from_json(
                {"auths": {HOST: {"username": "alice", "password": password}}}, "test config"
            )
        ]
    )


class Registry:
    """A registry and token server in one handler, both in memory.

    Tokens are ``t1``, ``t2`` … in order; ``valid`` decides which tokens the registry takes.
    """

    def __init__(
        self,
        *,
        token_field: str = "token",  # noqa: S107 - a JSON field name, not a password
        expires_in: int | None = 300,
        token_status: list[int] | None = None,
        accept: Callable[[str], bool] | None = None,
        deny_error: str | None = None,
    ) -> None:
        self.token_field = token_field
        self.expires_in = expires_in
        self.token_status = token_status or []
        self.accept = accept or (lambda header: header.startswith("Bearer t"))
        self.deny_error = deny_error
        self.issued = 0
        self.registry_requests: list[httpx.Request] = []
        self.token_requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return self.token(request)
        self.registry_requests.append(request)
        header = request.headers.get("authorization", "")
        if not self.accept(header):
            extra = f',error="{self.deny_error}"' if self.deny_error and header else ""
            return httpx.Response(401, headers={"WWW-Authenticate": CHALLENGE + extra})
        return httpx.Response(
            200,
            content=MANIFEST,
            headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": MANIFEST_DIGEST},
        )

    def token(self, request: httpx.Request) -> httpx.Response:
        self.token_requests.append(request)
        if self.token_status:
            status = self.token_status.pop(0)
            if status != 200:
                return httpx.Response(status, headers={"Retry-After": "0"})
        expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        if "authorization" in request.headers and request.headers["authorization"] != expected:
            return httpx.Response(401, json={"errors": [{"code": "UNAUTHORIZED"}]})
        self.issued += 1
        body: dict[str, object] = {self.token_field: f"t{self.issued}"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return httpx.Response(200, json=body)


def client(registry: Registry, keys: Keyring | None = None) -> RegistryClient:
    async def no_sleep(_seconds: float) -> None:
        return None

    return RegistryClient(
        keyring=keys,
        retry=RetryPolicy(attempts=3, sleep=no_sleep),
        transport=httpx.MockTransport(registry),
    )


@pytest.mark.parametrize("field", ["token", "access_token"])
async def test_bearer_flow_and_cache(field: str) -> None:
    registry = Registry(token_field=field)
    async with client(registry, keyring()) as c:
        first = await get_manifest(c, REF)
        await get_manifest(c, REF)
    assert first.digest == Digest(MANIFEST_DIGEST)
    assert registry.issued == 1  # the second request reused the cached token
    (token_request,) = registry.token_requests
    assert token_request.url.params.get_list("scope") == ["repository:family/base:pull"]
    assert token_request.url.params["service"] == "reg"
    assert token_request.headers["authorization"].startswith("Basic ")
    assert [r.headers.get("authorization") for r in registry.registry_requests] == [
        None,
        "Bearer t1",
        "Bearer t1",
    ]


async def test_anonymous_token_flow_sends_no_credentials() -> None:
    registry = Registry()
    async with client(registry) as c:
        await get_manifest(c, REF)
    assert "authorization" not in registry.token_requests[0].headers


async def test_token_expiry_refetches() -> None:
    registry = Registry(expires_in=100)
    now = [1000.0]
    async with client(registry, keyring()) as c:
        c.auth = Authenticator(keyring(), clock=lambda: now[0])
        await get_manifest(c, REF)
        now[0] += 85.0  # inside expires_in minus the renewal margin (10 s)
        await get_manifest(c, REF)
        assert registry.issued == 1
        now[0] += 10.0
        await get_manifest(c, REF)
    assert registry.issued == 2


async def test_rejected_token_refreshed_once() -> None:
    # The registry stops taking t1 (e.g. its signing key rotated): one refresh, no loop.
    registry = Registry(accept=lambda h: h in ("Bearer t1", "Bearer t2"))
    async with client(registry, keyring()) as c:
        await get_manifest(c, REF)
        registry.accept = lambda h: h == "Bearer t2"
        await get_manifest(c, REF)
    assert registry.issued == 2


async def test_missing_expires_in_defaults_to_60_seconds() -> None:
    grant = parse_token_response(b'{"token": "abc"}', REALM)
    assert (grant.token, grant.expires_in) == ("abc", 60)
    assert "abc" not in repr(grant)
    with pytest.raises(AuthenticationError, match="no token"):
        parse_token_response(b'{"expires_in": 60}', REALM)
    with pytest.raises(AuthenticationError, match="not JSON"):
        parse_token_response(b"<html>", REALM)


async def test_wrong_password_is_a_clear_error_without_secrets() -> None:
    registry = Registry()
    async with client(registry, keyring("wrong-" + PASSWORD)) as c:
        with pytest.raises(AuthenticationError, match="refused the configured credentials") as info:
            await get_manifest(c, REF)
    assert PASSWORD not in str(info.value) and "alice" not in str(info.value)
    assert len(registry.token_requests) == 1  # a 401 from the token server is not retried


async def test_anonymous_refused() -> None:
    registry = Registry(accept=lambda h: False)
    async with client(registry) as c:
        with pytest.raises(AuthenticationError, match=r"anonymous access .* refused"):
            await get_manifest(c, REF)
    assert len(registry.registry_requests) == 2  # the first try and one after the token


async def test_insufficient_scope_with_credentials_is_access_denied() -> None:
    registry = Registry(accept=lambda h: False, deny_error="insufficient_scope")
    async with client(registry, keyring()) as c:
        with pytest.raises(AccessDeniedError, match="not allowed"):
            await get_manifest(c, REF)


async def test_token_server_unavailable_is_retried_in_the_same_budget() -> None:
    registry = Registry(token_status=[503, 429, 200])
    async with client(registry, keyring()) as c:
        await get_manifest(c, REF)
    assert len(registry.token_requests) == 3


async def test_credentials_not_sent_to_plain_http_realm() -> None:
    registry = Registry()
    plain = 'Bearer realm="http://auth.example/token",service="reg"'

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return registry.token(request)
        return httpx.Response(401, headers={"WWW-Authenticate": plain})

    async with RegistryClient(keyring=keyring(), transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(AuthenticationError, match="plain-HTTP token realm"):
            await get_manifest(c, REF)
    assert registry.token_requests == []


async def test_credential_helper_is_reported() -> None:
    keys = Keyring([DockerConfig.from_json({"credHelpers": {HOST: "ecr-login"}}, "cfg")])
    async with client(Registry(), keys) as c:
        with pytest.raises(UnsupportedCredentialsError, match="ecr-login"):
            await get_manifest(c, REF)


async def test_basic_challenge_without_credentials() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="x"'})

    async with RegistryClient(transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(AuthenticationError, match="requires credentials"):
            await get_manifest(c, REF)


# --- manifest fetch rules --------------------------------------------------------------


def manifest_server(**headers: str) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(405)
        return httpx.Response(200, content=MANIFEST, headers=headers)

    return handler


async def test_digest_header_mismatch() -> None:
    wrong = "sha256:" + "f" * 64
    async with RegistryClient(
        registries={HOST: RegistryOptions(insecure=True)},
        transport=httpx.MockTransport(manifest_server(**{"Docker-Content-Digest": wrong})),
    ) as c:
        with pytest.raises(DigestMismatchError):
            await get_manifest(c, REF)
        with pytest.raises(DigestMismatchError):
            await get_manifest(c, REF, wrong)  # by digest: the body must hash to it


async def test_head_405_falls_back_and_missing_content_type_is_tolerated() -> None:
    async with RegistryClient(transport=httpx.MockTransport(manifest_server())) as c:
        assert await head_manifest(c, REF) is None
        fetched = await get_manifest(c, REF)
    assert fetched.digest == Digest(MANIFEST_DIGEST)
    assert fetched.media_type == OCI_MANIFEST


async def test_manifest_unknown() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})

    async with RegistryClient(transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(ManifestNotFoundError, match=r"reg.example/v2/family/base/manifests/v1"):
            await get_manifest(c, REF)


async def test_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    async with RegistryClient(registries={HOST: RegistryOptions(ca_file=missing)}) as c:
        with pytest.raises(RegistryConfigError, match="cannot load CA file"):
            await get_manifest(c, REF)


def bob() -> Keyring:
    return Keyring([DockerConfig.from_json(
        {"auths": {HOST: {"username": "bob", "password": "bobs-password"}}}, "bob's config")])


async def test_a_token_serves_only_the_credentials_it_was_issued_for() -> None:
    registry = Registry()  # the token server knows alice only
    async with client(registry) as c:
        with selected_keyring(keyring()):
            await get_manifest(c, REF)
        # The same registry and scope for another owner: alice's cached token must not
        # serve it; bob's own credentials are asked for, and refused.
        with selected_keyring(bob()), pytest.raises(AuthenticationError):
            await get_manifest(c, REF)
    assert [r.headers["authorization"] for r in registry.token_requests] == [
        "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode(),
        "Basic " + base64.b64encode(b"bob:bobs-password").decode()]


async def test_first_accepted_tries_each_owner_in_turn() -> None:
    registry = Registry()
    async with client(registry) as c:
        fetched = await first_accepted([bob(), keyring()], lambda: get_manifest(c, REF))
        assert fetched.digest == Digest(MANIFEST_DIGEST)
        with pytest.raises(AuthenticationError, match="refused the configured credentials"):
            await first_accepted([bob()], lambda: get_manifest(c, REF))
    assert [r.headers["authorization"].split()[0] for r in registry.token_requests] == [
        "Basic", "Basic", "Basic"]
    assert registry.issued == 1
