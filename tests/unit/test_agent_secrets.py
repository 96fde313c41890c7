"""The agent's credentials Secret: per-cache configs, and which of them a fetch may use.

The Secret's data comes from a small stand-in for the API (pure parsing logic); the real
Secret written by the operator is exercised end to end in tests/integration/test_e2e.py.
"""

from __future__ import annotations

import base64
import json
from typing import Any, cast

from layercache.agent.kubeapi import AgentKube
from layercache.agent.nodespec import parse_node_spec
from layercache.agent.secrets import Secrets

HOST = "reg.example:5000"


class _Kube:
    def __init__(self, data: dict[str, dict[str, str] | None]) -> None:
        self.data = data

    async def read_secret(self, name: str) -> dict[str, str] | None:
        return self.data.get(name)


def _b64(value: object) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def _config(user: str) -> dict[str, Any]:
    return {"auths": {HOST: {"username": user, "password": f"{user}-password"}}}


def _secrets(registry_data: dict[str, str] | None) -> Secrets:
    kube = _Kube({"token": {"token": base64.b64encode(b"t").decode()},
                  "creds": registry_data})
    return Secrets(cast(AgentKube, kube), "token", "creds")


def _users(secrets: Secrets, caches: list[str]) -> list[str | None]:
    found = []
    for keyring in secrets.keyrings_for(caches, HOST):
        credentials = keyring.credentials_for(HOST)
        found.append(credentials.username if credentials else None)
    return found


async def test_each_cache_keeps_its_own_credentials_for_one_registry() -> None:
    secrets = _secrets({"caches.json": _b64({"team-a/warm": [_config("alice")],
                                             "team-b/warm": [_config("bob")]})})
    assert await secrets.refresh() == []
    assert _users(secrets, ["team-a/warm"]) == ["alice"]
    assert _users(secrets, ["team-b/warm"]) == ["bob"]
    # A layer both want: the first cache's credentials first, then the other's.
    assert _users(secrets, ["team-b/warm", "team-a/warm"]) == ["bob", "alice"]
    # A cache with no credentials (or not in the Secret) fetches anonymously.
    assert _users(secrets, ["team-c/open"]) == [None]
    assert set(secrets.secrets) == {"t", "alice-password", "bob-password"}
    assert "password" not in repr(secrets)


async def test_a_dockerconfigjson_secret_applies_to_every_cache() -> None:
    secrets = _secrets({".dockerconfigjson": _b64(_config("shared"))})
    assert await secrets.refresh() == []
    assert _users(secrets, ["any/cache"]) == ["shared"]


async def test_a_malformed_entry_keeps_the_caches_previous_credentials() -> None:
    secrets = _secrets({"caches.json": _b64({"a/c": [_config("alice")]})})
    await secrets.refresh()
    cast(_Kube, secrets.kube).data["creds"] = {"caches.json": _b64(
        {"a/c": [{"auths": {HOST: {"auth": "!!"}}}], "b/c": [_config("bob")]})}
    problems = await secrets.refresh()
    assert [p.reason for p in problems] == ["CredentialsInvalid"]
    assert "a/c" in problems[0].message and "!!" not in problems[0].message
    assert _users(secrets, ["a/c"]) == ["alice"]
    assert _users(secrets, ["b/c"]) == ["bob"]


def test_layers_and_images_name_the_caches_that_want_them() -> None:
    spec = parse_node_spec({"metadata": {"name": "n1"}, "spec": {
        "nodeName": "n1", "caches": ["a/c", "b/c"],
        "layers": [{"digest": "sha256:" + "a" * 64, "size": 1, "source": "Upstream",
                    "repository": f"{HOST}/team-b/app", "caches": ["b/c", "a/c"]},
                   {"digest": "sha256:" + "b" * 64, "size": 1, "source": "Upstream",
                    "repository": f"{HOST}/team-b/app"}],
        "images": [{"reference": f"{HOST}/x@sha256:" + "c" * 64, "caches": ["a/c"]}]}})
    assert [layer.caches for layer in spec.layers] == [("b/c", "a/c"), ()]
    assert spec.image_caches == {f"{HOST}/x@sha256:" + "c" * 64: ("a/c",)}
