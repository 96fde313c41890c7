"""Docker config / pull-secret credential matching, as tables. Pure."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from layercache.registry.credentials import (
    Credentials,
    DockerConfig,
    InvalidDockerConfigError,
    Keyring,
    candidate_keyrings,
    registry_key,
)
from layercache.registry.errors import UnsupportedCredentialsError

SECRET = "s3cr3t-pa55:with:colons"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


CONFIG: dict[str, Any] = {
    "auths": {
        "https://index.docker.io/v1/": {"auth": b64(f"hubuser:{SECRET}")},
        "127.0.0.1:5000": {"username": "plain", "password": SECRET},
        "https://Reg.Example.COM:8443/v2/": {"auth": b64("mixed:pw")},
        "http://insecure.example": {"auth": b64("http:pw")},
        "ghcr.io": {"auth": b64("nopad:x").rstrip("=")},
        "empty.example": {},
        "token.example": {"identitytoken": "refresh-token-value"},
        "acr.example": {
            "auth": b64("00000000-0000-0000-0000-000000000000:"),
            "identitytoken": "refresh-token-value",
        },
        "myhost": {"auth": b64("short:pw")},
    },
    "credHelpers": {"gcr.io": "gcloud", "https://helper.example": "secretservice"},
}

# (registry as a Reference would have it, expected username or None)
MATCHES = [
    ("docker.io", "hubuser"),
    ("index.docker.io", "hubuser"),
    ("registry-1.docker.io", "hubuser"),
    ("127.0.0.1:5000", "plain"),
    ("127.0.0.1:5001", None),  # the port is part of the key
    ("127.0.0.1", None),
    ("reg.example.com:8443", "mixed"),
    ("insecure.example", "http"),
    ("ghcr.io", "nopad"),
    ("empty.example", None),  # an entry without credentials is anonymous
    ("quay.io", None),
    ("myhost", "short"),
]


@pytest.mark.parametrize(("registry", "username"), MATCHES)
def test_matches_by_registry_host(registry: str, username: str | None) -> None:
    found = DockerConfig.from_json(json.dumps(CONFIG), "config.json").credentials_for(registry)
    assert (found.username if found else None) == username


def test_password_with_colons_survives() -> None:
    found = DockerConfig.from_json(CONFIG, "config.json").credentials_for("docker.io")
    assert found == Credentials("hubuser", SECRET)


# (registry, fragment of the error)
UNSUPPORTED = [
    ("gcr.io", "docker-credential-gcloud"),
    ("helper.example", "docker-credential-secretservice"),
    ("token.example", "identitytoken"),
    ("acr.example", "identitytoken"),
]


@pytest.mark.parametrize(("registry", "reason"), UNSUPPORTED)
def test_unsupported_sources_are_clear_errors(registry: str, reason: str) -> None:
    config = DockerConfig.from_json(CONFIG, "config.json")
    with pytest.raises(UnsupportedCredentialsError, match=reason) as info:
        config.credentials_for(registry)
    assert "config.json" in str(info.value)
    assert "not supported" in str(info.value)


def test_creds_store_entry_without_credentials() -> None:
    config = DockerConfig.from_json({"auths": {"quay.io": {}}, "credsStore": "desktop"}, "c")
    with pytest.raises(UnsupportedCredentialsError, match="credsStore"):
        config.credentials_for("quay.io")
    assert config.credentials_for("other.example") is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("docker.io", "docker.io"),
        ("HTTP://Reg.Example:5000/v2/", "reg.example:5000"),
        ("localhost:5000", "localhost:5000"),
        ("[::1]:5000", "[::1]:5000"),
        ("myhost", "myhost"),
        (" quay.io ", "quay.io"),
    ],
)
def test_registry_key(text: str, key: str) -> None:
    assert registry_key(text) == key


def secret_data(config: dict[str, Any], key: str = ".dockerconfigjson") -> dict[str, str]:
    return {key: b64(json.dumps(config))}


def test_from_secret_data_dockerconfigjson() -> None:
    config = DockerConfig.from_secret_data(secret_data(CONFIG), "secret ns/pull")
    assert config.credentials_for("127.0.0.1:5000") == Credentials("plain", SECRET)


def test_from_secret_data_legacy_dockercfg() -> None:
    legacy = {"127.0.0.1:5000": {"auth": b64("old:pw")}}
    config = DockerConfig.from_secret_data(secret_data(legacy, ".dockercfg"), "secret ns/old")
    assert config.credentials_for("127.0.0.1:5000") == Credentials("old", "pw")


# (config or secret data, source kind, field named in the error)
INVALID: list[tuple[Any, str, str]] = [
    ("{not json", "json", "body"),
    ("[]", "json", "body"),
    ({"auths": []}, "json", "auths"),
    ({"auths": {"a.example": "x"}}, "json", "auths['a.example']"),
    ({"auths": {"a.example": {"auth": "%%%"}}}, "json", "auths['a.example'].auth"),
    ({"auths": {"a.example": {"auth": b64("nocolon")}}}, "json", "auths['a.example'].auth"),
    ({"auths": {"a.example": {"username": "u"}}}, "json", "auths['a.example']"),
    ({"credHelpers": {"a.example": 3}}, "json", "credHelpers"),
    ({"other": "x"}, "secret", "data"),
    ({".dockerconfigjson": "%%%"}, "secret", "data..dockerconfigjson"),
]


@pytest.mark.parametrize(("data", "kind", "field"), INVALID)
def test_invalid_configs_name_the_field(data: Any, kind: str, field: str) -> None:
    with pytest.raises(InvalidDockerConfigError) as info:
        if kind == "secret":
            DockerConfig.from_secret_data(data, "secret ns/s")
        else:
            DockerConfig.from_json(data, "cfg")
    assert info.value.field == field


def test_keyring_first_config_wins() -> None:
    first = DockerConfig.from_json({"auths": {"a.example": {"auth": b64("one:1")}}}, "first")
    second = DockerConfig.from_json(
        {"auths": {"a.example": {"auth": b64("two:2")}, "b.example": {"auth": b64("b:2")}}},
        "second",
    )
    keyring = Keyring([first, second])
    assert keyring.credentials_for("a.example") == Credentials("one", "1")
    assert keyring.credentials_for("b.example") == Credentials("b", "2")
    assert keyring.credentials_for("c.example") is None
    assert Keyring().credentials_for("a.example") is None


def test_secrets_never_in_repr_or_errors() -> None:
    credentials = Credentials("hubuser", SECRET)
    config = DockerConfig.from_json(CONFIG, "config.json")
    texts = [
        repr(credentials),
        str(credentials),
        repr(config),
        repr(Keyring([config])),
        f"{credentials}",
        f"{[credentials]}",
    ]
    lone = "lone-secret-without-a-colon"
    bad = {"auths": {"a.example": {"auth": b64(lone)}}}
    with pytest.raises(InvalidDockerConfigError) as info:
        DockerConfig.from_json(bad, "cfg")
    assert lone not in str(info.value) and b64(lone) not in str(info.value)
    texts.append(str(info.value))
    for text in texts:
        assert SECRET not in text
        assert "hubuser" not in text
        assert b64(f"hubuser:{SECRET}") not in text


def test_basic_authorization() -> None:
    header = Credentials("user", "pa:ss").basic_authorization()
    assert header == "Basic " + b64("user:pa:ss")


def _config(source: str, **auths: dict[str, str]) -> DockerConfig:
    return DockerConfig.from_json({"auths": {k.replace("_", "."): v for k, v in auths.items()}},
                                  source)


def test_candidate_keyrings_one_per_distinct_credential_in_order() -> None:
    a = _config("a", reg_example={"username": "a", "password": "pa"})
    b = _config("b", reg_example={"username": "b", "password": "pb"})
    again = _config("a again", reg_example={"username": "a", "password": "pa"})
    other = _config("other", other_example={"username": "o", "password": "po"})
    helper = DockerConfig.from_json({"credHelpers": {"reg.example": "gcloud"}}, "helper")
    found = candidate_keyrings([other, a, again, helper, b], "reg.example")
    assert [k.configs[0].source for k in found] == ["a", "helper", "b"]
    anonymous = candidate_keyrings([other], "reg.example")
    assert len(anonymous) == 1 and anonymous[0].credentials_for("reg.example") is None
