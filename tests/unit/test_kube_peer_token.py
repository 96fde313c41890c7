"""KubeApi.ensure_peer_token: create once, never overwrite a token agents already read."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from layercache.controller.kube import KubeApi


class FakeCore:
    """The three Secret calls ensure_peer_token may make, against an in-memory dict."""

    def __init__(self, existing: dict[str, Any] | None = None, *, lose_race: bool = False):
        self.secrets = dict(existing or {})
        self.lose_race = lose_race  # another replica creates it between our read and create
        self.created: list[str] = []
        self.replaced: list[str] = []

    def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        if name not in self.secrets:
            raise ApiException(status=404)
        return self.secrets[name]

    def create_namespaced_secret(self, namespace: str, body: Any) -> Any:
        name = body["metadata"]["name"]
        if self.lose_race:
            self.secrets[name] = {"data": {"token": "the-winner's"}}
        if name in self.secrets:
            raise ApiException(status=409)
        self.created.append(name)
        self.secrets[name] = body
        return body

    def replace_namespaced_secret(self, name: str, namespace: str, body: Any) -> Any:
        self.replaced.append(name)
        raise AssertionError("the peer token is never replaced")


def _kube(core: FakeCore) -> KubeApi:
    kube = KubeApi(client.ApiClient())
    kube.core = core  # type: ignore[assignment]
    return kube


def test_created_when_missing() -> None:
    core = FakeCore()
    _kube(core).ensure_peer_token("ns", "peer-token")
    assert core.created == ["peer-token"]
    assert len(core.secrets["peer-token"]["data"]["token"]) >= 40  # base64 of 32 random bytes


def test_kept_when_present() -> None:
    core = FakeCore({"peer-token": {"data": {"token": "kept"}}})
    _kube(core).ensure_peer_token("ns", "peer-token")
    assert core.created == [] and core.secrets["peer-token"] == {"data": {"token": "kept"}}


def test_losing_the_creation_race_keeps_the_winners_token() -> None:
    core = FakeCore(lose_race=True)
    _kube(core).ensure_peer_token("ns", "peer-token")
    assert core.secrets["peer-token"] == {"data": {"token": "the-winner's"}}
    assert core.replaced == []


def test_other_errors_are_raised() -> None:
    class Forbidden(FakeCore):
        def read_namespaced_secret(self, name: str, namespace: str) -> Any:
            raise ApiException(status=403)
    with pytest.raises(ApiException):
        _kube(Forbidden()).ensure_peer_token("ns", "peer-token")
