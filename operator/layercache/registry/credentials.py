"""Registry credentials from Docker config JSON and ``kubernetes.io/dockerconfigjson`` Secrets.

The format is Docker's ``config.json`` (docker/cli ``configfile``) as the kubelet reads
image pull secrets (``pkg/credentialprovider``)::

    {"auths": {"registry.example:5000": {"auth": "<base64 user:password>"},
               "https://index.docker.io/v1/": {"username": "u", "password": "p"}},
     "credHelpers": {"gcr.io": "gcloud"}, "credsStore": "desktop"}

Keys are matched by registry host: the scheme and any path are dropped (``https://host/v1/``
→ ``host``), the host is lower-cased and Docker Hub's aliases (``index.docker.io``,
``registry-1.docker.io``, ``docker.io``) are one key, as in `layercache.oci.reference`. Unlike
the kubelet we do not match ``*.domain`` wildcards or repository path prefixes: pull
secrets written by ``kubectl create secret docker-registry`` never use them.

Credential helpers cannot run inside the operator; a config that sends a registry to one
is a clear `UnsupportedCredentialsError`, not a silent anonymous pull. Credentials are
kept out of every ``repr``, log line and error message.

Credentials stay with whoever gave them: a request made for one LayerCache (or one Pod's
image) runs under `selected_keyring` with only that owner's configs, and `first_accepted`
tries each owner's credentials in turn until the registry accepts one — as the kubelet
tries each of a Pod's ``imagePullSecrets`` — instead of merging configs by registry host,
where the first would shadow the others.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Final, TypeVar

from layercache.oci.reference import InvalidReferenceError, parse_reference
from layercache.registry.errors import RegistryAuthError, UnsupportedCredentialsError

__all__ = [
    "Credentials",
    "DockerConfig",
    "InvalidDockerConfigError",
    "Keyring",
    "candidate_keyrings",
    "first_accepted",
    "registry_key",
    "selected_keyring",
]

T = TypeVar("T")

#: Data keys of the two Secret types the kubelet accepts as image pull secrets.
DOCKERCONFIGJSON_KEY: Final = ".dockerconfigjson"
DOCKERCFG_KEY: Final = ".dockercfg"


class InvalidDockerConfigError(ValueError):
    """A Docker config is malformed; names its source and the field, never a value."""

    def __init__(self, source: str, field: str, reason: str) -> None:
        super().__init__(f"{source}: {field}: {reason}")
        self.source = source
        self.field = field


class Credentials:
    """A username and password (or token as password) for HTTP basic auth and token requests.

    Both stay out of ``repr``/``str`` so they cannot leak through logs or tracebacks.
    """

    __slots__ = ("_password", "_username")

    def __init__(self, username: str, password: str) -> None:
        self._username = username
        self._password = password

    @property
    def username(self) -> str:
        """The user name."""
        return self._username

    @property
    def password(self) -> str:
        """The password (or an access token used as one)."""
        return self._password

    def basic_authorization(self) -> str:
        """The ``Authorization`` header value for HTTP basic auth (RFC 7617)."""
        raw = f"{self._username}:{self._password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credentials):
            return NotImplemented
        return (self._username, self._password) == (other._username, other._password)

    def __hash__(self) -> int:
        return hash((self._username, self._password))

    def __repr__(self) -> str:
        return "Credentials(<redacted>)"

    __str__ = __repr__


def registry_key(text: str) -> str:
    """The registry key a Docker config ``auths`` key (or a registry host) matches under.

    ``https://index.docker.io/v1/`` → ``docker.io``; ``HTTP://Reg.Example:5000/v2/`` →
    ``reg.example:5000``; ``myhost`` → ``myhost``.
    """
    host = text.strip()
    lowered = host.lower()
    for scheme in ("https://", "http://"):
        if lowered.startswith(scheme):
            host = host[len(scheme) :]
            break
    host = host.partition("/")[0].lower()
    try:
        # A dummy path lets the reference grammar canonicalise host, port and Hub aliases.
        return parse_reference(f"{host}/x").registry if ("." in host or ":" in host) else host
    except InvalidReferenceError:
        return host


class _Entry:
    __slots__ = ("credentials", "unsupported")

    def __init__(self, credentials: Credentials | None, unsupported: str | None) -> None:
        self.credentials = credentials
        self.unsupported = unsupported


class DockerConfig:
    """A parsed Docker config: ``auths`` by registry key, credential helpers, creds store.

    Build one with `from_json`, `from_file` or `from_secret_data`. ``source`` names where it
    came from (a path, ``secret ns/name``) for error messages.
    """

    def __init__(
        self,
        source: str,
        entries: Mapping[str, _Entry],
        cred_helpers: Mapping[str, str],
        creds_store: str | None,
    ) -> None:
        self.source = source
        self._entries = dict(entries)
        self._helpers = dict(cred_helpers)
        self._store = creds_store

    def __repr__(self) -> str:
        return f"DockerConfig(source={self.source!r}, registries={sorted(self._entries)})"

    @property
    def registries(self) -> list[str]:
        """Registry keys that have an ``auths`` entry, sorted."""
        return sorted(self._entries)

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any], source: str) -> DockerConfig:
        """Parse config JSON (text, bytes or already decoded).

        A legacy ``.dockercfg`` body (the ``auths`` map itself, without the wrapper) is
        accepted too.

        Raises:
            InvalidDockerConfigError: not JSON, not an object, or a malformed entry.

        """
        if isinstance(data, str | bytes):
            try:
                decoded = json.loads(data)
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidDockerConfigError(
                    source, "body", f"not JSON ({exc.__class__.__name__})"
                ) from None
        else:
            decoded = data
        if not isinstance(decoded, Mapping):
            raise InvalidDockerConfigError(source, "body", "not a JSON object")
        if not {"auths", "credHelpers", "credsStore"} & decoded.keys():
            decoded = {"auths": decoded}  # legacy .dockercfg
        auths = decoded.get("auths")
        auths = {} if auths is None else auths
        helpers = decoded.get("credHelpers")
        helpers = {} if helpers is None else helpers
        store = decoded.get("credsStore")
        if not isinstance(auths, Mapping):
            raise InvalidDockerConfigError(source, "auths", "not an object")
        if not isinstance(helpers, Mapping) or not all(
            isinstance(v, str) for v in helpers.values()
        ):
            raise InvalidDockerConfigError(source, "credHelpers", "not an object of strings")
        if store is not None and not isinstance(store, str):
            raise InvalidDockerConfigError(source, "credsStore", "not a string")
        entries: dict[str, _Entry] = {}
        for key, raw in auths.items():
            entry = _parse_entry(source, str(key), raw)
            known = entries.get(registry_key(str(key)))
            # Two spellings of one registry: the first that holds credentials wins.
            if known is None or (known.credentials is None and known.unsupported is None):
                entries[registry_key(str(key))] = entry
        return cls(
            source,
            entries,
            {registry_key(str(k)): str(v) for k, v in helpers.items()},
            store or None,
        )

    @classmethod
    def from_file(cls, path: Path) -> DockerConfig:
        """Read and parse a config file (``~/.docker/config.json``).

        Raises:
            OSError: the file cannot be read.
            InvalidDockerConfigError: see `from_json`.

        """
        return cls.from_json(path.read_bytes(), str(path))

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str], source: str) -> DockerConfig:
        """Parse a Secret's ``data`` (base64 values, as the API returns them).

        Type ``kubernetes.io/dockerconfigjson`` keeps the config under ``.dockerconfigjson``;
        the legacy ``kubernetes.io/dockercfg`` keeps the ``auths`` map under ``.dockercfg``.

        Raises:
            InvalidDockerConfigError: neither key present, bad base64, or a malformed config.

        """
        for key in (DOCKERCONFIGJSON_KEY, DOCKERCFG_KEY):
            if key in data:
                try:
                    raw = base64.b64decode(data[key], validate=True)
                except (binascii.Error, ValueError):
                    raise InvalidDockerConfigError(source, f"data.{key}", "not base64") from None
                return cls.from_json(raw, source)
        raise InvalidDockerConfigError(
            source, "data", f"has neither {DOCKERCONFIGJSON_KEY} nor {DOCKERCFG_KEY}"
        )

    def credentials_for(self, registry: str) -> Credentials | None:
        """Credentials for ``registry`` (a host or `Reference.registry`), None for anonymous.

        Raises:
            UnsupportedCredentialsError: the registry's credentials live in a credential
                helper (``credHelpers``, or ``credsStore`` for an entry without them), or in
                an ``identitytoken``/``registrytoken`` we do not use.

        """
        key = registry_key(registry)
        helper = self._helpers.get(key)
        if helper is not None:
            raise UnsupportedCredentialsError(
                f"{self.source}: credHelpers sends {key} to docker-credential-{helper}; "
                "credential helpers are not supported: put the credentials in 'auths' "
                "(a kubernetes.io/dockerconfigjson Secret)"
            )
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.unsupported is not None:
            raise UnsupportedCredentialsError(
                f"{self.source}: auths entry for {key} holds {entry.unsupported}, "
                "which is not supported; give username and password (or auth)"
            )
        if entry.credentials is None and self._store is not None:
            raise UnsupportedCredentialsError(
                f"{self.source}: the credentials for {key} are in credsStore "
                f"docker-credential-{self._store}; credential stores are not supported"
            )
        return entry.credentials


def _parse_entry(source: str, key: str, raw: object) -> _Entry:
    field = f"auths[{key!r}]"
    if not isinstance(raw, Mapping):
        raise InvalidDockerConfigError(source, field, "not an object")
    # Token entries first: `az acr login` writes a dummy `auth` beside its identity token.
    for token_field in ("identitytoken", "registrytoken"):
        if raw.get(token_field):
            return _Entry(None, token_field)
    auth = raw.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise InvalidDockerConfigError(source, f"{field}.auth", "not a string")
        try:
            # Some writers drop the padding; base64 needs it.
            decoded = base64.b64decode(auth + "=" * (-len(auth) % 4), validate=True).decode()
        except (binascii.Error, ValueError):
            raise InvalidDockerConfigError(
                source, f"{field}.auth", "not base64 of UTF-8 'username:password'"
            ) from None
        username, colon, password = decoded.partition(":")
        if not colon or not username:
            raise InvalidDockerConfigError(
                source, f"{field}.auth", "does not decode to 'username:password'"
            )
        return _Entry(Credentials(username, password), None)
    user, secret = raw.get("username"), raw.get("password")
    if user or secret:
        if not isinstance(user, str) or not isinstance(secret, str) or not user:
            raise InvalidDockerConfigError(
                source, field, "needs both username and password as strings"
            )
        return _Entry(Credentials(user, secret), None)
    return _Entry(None, None)


class Keyring:
    """Several Docker configs searched in order (e.g. a LayerCache's pull secrets).

    The first config with an entry for the registry wins, as the kubelet does for a pod's
    ``imagePullSecrets`` (it tries each; we cannot try, so order decides).
    """

    def __init__(self, configs: Sequence[DockerConfig] = ()) -> None:
        self.configs = tuple(configs)

    def __repr__(self) -> str:
        return f"Keyring({[c.source for c in self.configs]})"

    def credentials_for(self, registry: str) -> Credentials | None:
        """Credentials for ``registry`` from the first config that has them, else None.

        Raises:
            UnsupportedCredentialsError: the first config that mentions the registry sends
                it to a credential helper or token we cannot use.

        """
        for config in self.configs:
            found = config.credentials_for(registry)
            if found is not None:
                return found
        return None


#: The keyring chosen for the running task (`selected_keyring`); None: the client's own.
_SELECTED: ContextVar[Keyring | None] = ContextVar("layercache_selected_keyring", default=None)


@contextlib.contextmanager
def selected_keyring(keyring: Keyring) -> Iterator[None]:
    """Within the block, registry requests of this task authenticate from ``keyring`` only.

    `layercache.registry.auth.Authenticator` asks `current_keyring` before its own keyring,
    so one shared `RegistryClient` (one connection pool) can fetch for many owners without
    mixing their credentials. Tasks started inside the block inherit the choice (contextvars).
    """
    token = _SELECTED.set(keyring)
    try:
        yield
    finally:
        _SELECTED.reset(token)


def current_keyring() -> Keyring | None:
    """The keyring `selected_keyring` chose for this task, None outside such a block."""
    return _SELECTED.get()


def candidate_keyrings(configs: Sequence[DockerConfig], registry: str) -> list[Keyring]:
    """One single-config keyring per distinct credential for ``registry`` in ``configs``.

    In ``configs`` order, each set of credentials once; a config whose entry for the
    registry is unusable (credential helper, identity token) is kept as a candidate, so its
    `UnsupportedCredentialsError` is reported when no other candidate works. ``[Keyring()]``
    (anonymous) when no config mentions the registry.
    """
    found: list[Keyring] = []
    seen: set[Credentials] = set()
    for config in configs:
        try:
            credentials = config.credentials_for(registry)
        except UnsupportedCredentialsError:
            found.append(Keyring([config]))
            continue
        if credentials is not None and credentials not in seen:
            seen.add(credentials)
            found.append(Keyring([config]))
    return found or [Keyring()]


async def first_accepted(keyrings: Sequence[Keyring], action: Callable[[], Awaitable[T]]) -> T:
    """Run ``action`` under each of ``keyrings`` in turn until the registry accepts one.

    Only an authentication or authorisation failure (`RegistryAuthError`) moves on to the
    next keyring; any other error is raised at once. ``keyrings`` must not be empty.

    Raises:
        RegistryAuthError: every keyring was refused (the first refusal that was not an
            unsupported credential source, else the last one).
        ValueError: ``keyrings`` is empty.
        Exception: whatever ``action`` raises otherwise.

    """
    if not keyrings:
        raise ValueError("first_accepted needs at least one keyring")
    refusals: list[RegistryAuthError] = []
    for keyring in keyrings:
        with selected_keyring(keyring):
            try:
                return await action()
            except RegistryAuthError as error:
                refusals.append(error)
    meaningful = [e for e in refusals if not isinstance(e, UnsupportedCredentialsError)]
    raise (meaningful or refusals)[0]
