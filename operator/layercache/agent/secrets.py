"""The two Secrets the agent reads, by name, from its own namespace.

- the peer token (Secret `AgentSettings.peer_token_secret`, key ``token``): what agents
  present to each other; without it the agent neither serves nor asks peers;
- upstream registry credentials (Secret `AgentSettings.registry_secret`, type
  ``kubernetes.io/dockerconfigjson``): a missing Secret means anonymous pulls.

Both are re-read every `AgentSettings.secret_refresh_seconds`, so a rotated token or
password is picked up without a restart. Values stay in memory only; `secrets` lists them
so that error messages can be scrubbed before they reach status or logs.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass, field

from kubernetes.client.exceptions import ApiException

from layercache.agent.kubeapi import AgentKube
from layercache.registry.credentials import (
    Credentials,
    DockerConfig,
    InvalidDockerConfigError,
    Keyring,
)

__all__ = ["LiveKeyring", "SecretProblem", "Secrets"]

log = logging.getLogger(__name__)

#: Data key of the peer token in its Secret.
TOKEN_KEY = "token"  # noqa: S105 - the name of a data key, not a secret


@dataclass(frozen=True)
class SecretProblem:
    """Why a Secret could not be used: a CamelCase ``reason`` and a message without values."""

    reason: str
    message: str


@dataclass
class Secrets:
    """The current peer token and registry keyring, and how to refresh them from the API."""

    kube: AgentKube
    token_secret: str
    registry_secret: str
    token: str | None = field(default=None, repr=False)
    keyring: Keyring = field(default_factory=Keyring)
    _values: tuple[str, ...] = field(default=(), repr=False)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value held (token, passwords), to blank out of messages."""
        return self._values

    async def refresh(self) -> list[SecretProblem]:
        """Read both Secrets again; keep the old values of one that cannot be read.

        Returns the problems found (empty when all is well); never raises for an API error.
        """
        problems: list[SecretProblem] = []
        token = self.token
        try:
            data = await self.kube.read_secret(self.token_secret)
            token = self._token(data, problems)
        except ApiException as error:
            problems.append(SecretProblem("PeerTokenUnreadable",
                                          f"Secret {self.token_secret}: HTTP {error.status}"))
        keyring = self.keyring
        try:
            data = await self.kube.read_secret(self.registry_secret)
            keyring = self._keyring(data, problems)
        except ApiException as error:
            problems.append(SecretProblem("CredentialsUnreadable",
                                          f"Secret {self.registry_secret}: HTTP {error.status}"))
        self.token, self.keyring = token, keyring
        self._values = tuple(v for v in (token, *_passwords(keyring)) if v)
        return problems

    def _token(self, data: dict[str, str] | None,
               problems: list[SecretProblem]) -> str | None:
        if data is None or TOKEN_KEY not in data:
            problems.append(SecretProblem(
                "PeerTokenMissing", f"Secret {self.token_secret} (key {TOKEN_KEY!r}) not "
                                    "found: peers are neither served nor asked"))
            return None
        try:
            token = base64.b64decode(data[TOKEN_KEY], validate=True).decode().strip()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            token = ""
        if not token:
            problems.append(SecretProblem(
                "PeerTokenInvalid", f"Secret {self.token_secret}: key {TOKEN_KEY!r} is empty "
                                    "or not text"))
            return None
        return token

    def _keyring(self, data: dict[str, str] | None,
                 problems: list[SecretProblem]) -> Keyring:
        if data is None:
            return Keyring()  # no Secret: anonymous pulls, as documented
        source = f"Secret {self.registry_secret}"
        try:
            return Keyring([DockerConfig.from_secret_data(data, source)])
        except InvalidDockerConfigError as error:
            # The error names the field, never a value.
            problems.append(SecretProblem("CredentialsInvalid", str(error)))
            return self.keyring


def _passwords(keyring: Keyring) -> list[str]:
    values: list[str] = []
    for docker_config in keyring.configs:
        for registry in docker_config.registries:
            try:
                credentials = docker_config.credentials_for(registry)
            except Exception:  # noqa: S112 - an unusable entry holds no password to hide
                continue
            if credentials is not None:
                values.append(credentials.password)
    return values


class LiveKeyring(Keyring):
    """A keyring that always answers from the latest `Secrets.keyring`.

    The registry client takes its keyring once; this one follows Secret refreshes.
    """

    def __init__(self, secrets: Secrets) -> None:
        super().__init__()
        self._secrets = secrets

    def __repr__(self) -> str:
        return f"LiveKeyring({self._secrets.registry_secret})"

    def credentials_for(self, registry: str) -> Credentials | None:
        """Credentials for ``registry`` from the current Secret (None: anonymous).

        Raises:
            UnsupportedCredentialsError: they live in a credential helper.

        """
        return self._secrets.keyring.credentials_for(registry)
