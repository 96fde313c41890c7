"""The two Secrets the agent reads, by name, from its own namespace.

- the peer token (Secret `AgentSettings.peer_token_secret`, key ``token``): what agents
  present to each other; without it the agent neither serves nor asks peers;
- upstream registry credentials (Secret `AgentSettings.registry_secret`), written by the
  operator per LayerCache: key ``caches.json`` holds ``{"namespace/name": [config, ...]}``,
  each config a Docker config object (``{"auths": ...}``). A layer is fetched only with the
  credentials of the caches that want it (`Secrets.keyrings_for`), never with another
  team's. A Secret of type ``kubernetes.io/dockerconfigjson`` (an older operator, or one
  written by hand) applies to every cache. A missing Secret means anonymous pulls.

Both are re-read every `AgentSettings.secret_refresh_seconds`, so a rotated token or
password is picked up without a restart. Values stay in memory only; `secrets` lists them
so that error messages can be scrubbed before they reach status or logs.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from kubernetes.client.exceptions import ApiException

from layercache.agent.ports import AgentKubePort
from layercache.api import Reason
from layercache.registry.credentials import (
    Credentials,
    DockerConfig,
    InvalidDockerConfigError,
    Keyring,
    candidate_keyrings,
)

__all__ = ["LiveKeyring", "SecretProblem", "Secrets"]

log = logging.getLogger(__name__)

#: Data key of the peer token in its Secret.
TOKEN_KEY = "token"  # noqa: S105 - the name of a data key, not a secret
#: Data key of the per-cache credentials (layercache.controller.reconciler.CREDENTIALS_KEY).
CACHES_KEY = "caches.json"


@dataclass(frozen=True)
class SecretProblem:
    """Why a Secret could not be used: a CamelCase ``reason`` and a message without values."""

    reason: str
    message: str


@dataclass
class Secrets:
    """The current peer token and registry credentials, and how to refresh them from the API.

    ``by_cache`` holds each LayerCache's Docker configs in the order to try them;
    ``keyring`` those that apply to every cache (a ``kubernetes.io/dockerconfigjson``
    Secret).
    """

    kube: AgentKubePort
    token_secret: str
    registry_secret: str
    token: str | None = field(default=None, repr=False)
    keyring: Keyring = field(default_factory=Keyring)
    by_cache: dict[str, tuple[DockerConfig, ...]] = field(default_factory=dict, repr=False)
    _values: tuple[str, ...] = field(default=(), repr=False)

    def keyrings_for(self, caches: Sequence[str], registry: str) -> list[Keyring]:
        """The keyrings to try, in order, for a request to ``registry`` made for ``caches``.

        Only configs of ``caches`` (``namespace/name``, in their order) and those for every
        cache; see `layercache.registry.credentials.candidate_keyrings`.
        """
        configs = [c for cache in caches for c in self.by_cache.get(cache, ())]
        return candidate_keyrings([*configs, *self.keyring.configs], registry)

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
            problems.append(SecretProblem(Reason.PEER_TOKEN_UNREADABLE,
                                          f"Secret {self.token_secret}: HTTP {error.status}"))
        keyring, by_cache = self.keyring, self.by_cache
        try:
            data = await self.kube.read_secret(self.registry_secret)
            if data is not None and CACHES_KEY in data:
                keyring, by_cache = Keyring(), self._by_cache(data[CACHES_KEY], problems)
            else:
                keyring, by_cache = self._keyring(data, problems), {}
        except ApiException as error:
            problems.append(SecretProblem(Reason.CREDENTIALS_UNREADABLE,
                                          f"Secret {self.registry_secret}: HTTP {error.status}"))
        self.token, self.keyring, self.by_cache = token, keyring, by_cache
        configs = [*keyring.configs, *(c for found in by_cache.values() for c in found)]
        self._values = tuple(v for v in (token, *_passwords(configs)) if v)
        return problems

    def _by_cache(self, encoded: str, problems: list[SecretProblem]
                  ) -> dict[str, tuple[DockerConfig, ...]]:
        """Parse ``caches.json``; a cache whose configs are malformed keeps its old ones."""
        source = f"Secret {self.registry_secret} key {CACHES_KEY}"
        try:
            raw = json.loads(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            raw = None
        if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
            problems.append(SecretProblem(
                Reason.CREDENTIALS_INVALID, f"{source}: not base64 of a JSON object of lists"))
            return self.by_cache
        found: dict[str, tuple[DockerConfig, ...]] = {}
        for cache, configs in raw.items():
            try:
                found[cache] = tuple(DockerConfig.from_json(c, f"{source} [{cache!r}][{i}]")
                                     for i, c in enumerate(configs))
            except InvalidDockerConfigError as error:  # names the field, never a value
                problems.append(SecretProblem(Reason.CREDENTIALS_INVALID, str(error)))
                if cache in self.by_cache:
                    found[cache] = self.by_cache[cache]
        return found

    def _token(self, data: dict[str, str] | None,
               problems: list[SecretProblem]) -> str | None:
        if data is None or TOKEN_KEY not in data:
            problems.append(SecretProblem(
                Reason.PEER_TOKEN_MISSING, f"Secret {self.token_secret} (key {TOKEN_KEY!r}) not "
                                    "found: peers are neither served nor asked"))
            return None
        try:
            token = base64.b64decode(data[TOKEN_KEY], validate=True).decode().strip()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            token = ""
        if not token:
            problems.append(SecretProblem(
                Reason.PEER_TOKEN_INVALID,
                f"Secret {self.token_secret}: key {TOKEN_KEY!r} is empty or not text"))
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
            problems.append(SecretProblem(Reason.CREDENTIALS_INVALID, str(error)))
            return self.keyring


def _passwords(configs: Sequence[DockerConfig]) -> list[str]:
    values: list[str] = []
    for docker_config in configs:
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

    The registry client takes its keyring once; this one follows Secret refreshes. It
    holds only credentials meant for every cache: fetches for caches run under
    `Secrets.keyrings_for` (`layercache.registry.credentials.first_accepted`).
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
