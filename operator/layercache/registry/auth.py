"""Registry authentication: anonymous, HTTP basic, and bearer tokens with a token cache.

The flow is the distribution token spec (``docs/spec/auth/token.md``): a request answered
401 carries ``WWW-Authenticate: Bearer realm=…,service=…,scope=…``; we ``GET realm`` with
``service`` and ``scope`` (HTTP basic credentials when we have them, none for anonymous),
take ``token`` (or its OAuth2 alias ``access_token``) from the JSON answer, and send
``Authorization: Bearer <token>``. ``expires_in`` (seconds, 60 when omitted) bounds how
long we reuse it; tokens are cached per (registry, scope). A ``Basic`` challenge means the
registry itself takes the credentials (htpasswd).

Which scheme a registry wants is learnt from its first challenge, so later requests carry
credentials up front instead of paying a 401 round trip each time. Credentials and tokens
never appear in logs, errors or reprs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import httpx

from layercache.registry.challenge import Challenge, ChallengeParseError, parse_www_authenticate
from layercache.registry.credentials import Credentials, Keyring, current_keyring
from layercache.registry.errors import (
    AccessDeniedError,
    AuthenticationError,
    RateLimitedError,
    RegistryConnectionError,
    RegistryStatusError,
    ServerError,
    UnsupportedCredentialsError,
)
from layercache.registry.retry import parse_retry_after

__all__ = ["Authenticator", "TokenGrant", "parse_token_response", "repository_scope"]

log = logging.getLogger(__name__)

#: Token lifetime when the token server omits ``expires_in`` (token spec: 60 seconds).
DEFAULT_EXPIRES_IN: Final = 60
#: Largest token response we read, bytes (JWTs are a few kilobytes).
MAX_TOKEN_RESPONSE: Final = 1024 * 1024


def repository_scope(repository: str, actions: str = "pull") -> str:
    """The token scope for ``actions`` on ``repository`` (``repository:NAME:pull``)."""
    return f"repository:{repository}:{actions}"


@dataclass(frozen=True)
class TokenGrant:
    """A token from the token server; ``expires_in`` in seconds. Token kept out of repr."""

    token: str = field(repr=False)
    expires_in: int


def parse_token_response(body: bytes, realm: str) -> TokenGrant:
    """Read the token server's JSON answer (token spec "Token Response Fields").

    ``token`` and ``access_token`` are synonyms (OAuth2 compatibility); either will do.
    A missing, non-integer or non-positive ``expires_in`` gives the spec's 60 s.

    Raises:
        AuthenticationError: not JSON, or neither token field present (names the realm).

    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise AuthenticationError(f"token server {realm}: answer is not JSON") from None
    if not isinstance(document, dict):
        raise AuthenticationError(f"token server {realm}: answer is not a JSON object")
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not token:
        raise AuthenticationError(f"token server {realm}: answer has no token or access_token")
    expires_in = document.get("expires_in")
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN
    return TokenGrant(token, expires_in)


@dataclass
class _Cached:
    header: str = field(repr=False)
    expires_at: float


class Authenticator:
    """Decides the ``Authorization`` header for each request and handles 401 challenges.

    One per `RegistryClient`; safe for concurrent use within one event loop. ``keyring``
    supplies credentials by registry host (None: anonymous everywhere). ``clock`` is a
    monotonic clock in seconds (tests move it).
    """

    def __init__(
        self, keyring: Keyring | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._keyring = keyring or Keyring()
        self._clock = clock
        self._schemes: dict[str, Challenge] = {}
        # Keyed by the credentials too: a token obtained with one owner's credentials must
        # never serve a request made for another (`selected_keyring`).
        self._tokens: dict[tuple[str, str, Credentials | None], _Cached] = {}
        self._locks: dict[tuple[str, str, Credentials | None], asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"Authenticator(registries={sorted(self._schemes)})"

    def credentials(self, registry: str) -> Credentials | None:
        """Credentials for ``registry`` (None: anonymous).

        From the keyring selected for the running task (`selected_keyring`) if any, else
        from this authenticator's own keyring.

        Raises:
            UnsupportedCredentialsError: they live in a credential helper.

        """
        return (current_keyring() or self._keyring).credentials_for(registry)

    def _token_key(self, registry: str, scope: str) -> tuple[str, str, Credentials | None]:
        try:
            return registry, scope, self.credentials(registry)
        except UnsupportedCredentialsError:
            return registry, scope, None

    def header(self, registry: str, scope: str) -> str | None:
        """The ``Authorization`` value to send up front, or None (anonymous / unknown yet)."""
        challenge = self._schemes.get(registry)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            credentials = self.credentials(registry)
            return credentials.basic_authorization() if credentials else None
        cached = self._tokens.get(self._token_key(registry, scope))
        if cached is not None and cached.expires_at > self._clock():
            return cached.header
        return None

    async def answer(
        self,
        http: httpx.AsyncClient,
        registry: str,
        scope: str,
        response: httpx.Response,
        stale: str | None,
        *,
        allow_plain_http: bool,
    ) -> str:
        """The ``Authorization`` value to retry with after ``response`` came back 401.

        ``stale`` is the value that was refused (None if we sent none): a cached token equal
        to it is not reused. ``allow_plain_http``: credentials may go to an ``http://``
        realm (only for registries the user marked insecure).

        Raises:
            AuthenticationError: no usable challenge; credentials needed but none
                configured; the token server refused the credentials.
            TransientError: the token server failed in a way worth retrying.
            UnsupportedCredentialsError: credentials live in a credential helper.

        """
        challenge = _pick_challenge(registry, response)
        self._schemes[registry] = challenge
        credentials = self.credentials(registry)
        if challenge.scheme == "basic":
            if credentials is None:
                raise AuthenticationError(
                    f"{registry} requires credentials (HTTP basic) and none are configured"
                )
            return credentials.basic_authorization()
        key = (registry, scope, credentials)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            # Another task may have fetched a fresh token while we waited for the lock.
            cached = self._tokens.get(key)
            if cached and cached.header != stale and cached.expires_at > self._clock():
                return cached.header
            grant = await _fetch_token(
                http, registry, challenge, scope, credentials, allow_plain_http
            )
            header = f"Bearer {grant.token}"
            # Renew a little early so a token never expires in flight.
            margin = min(30.0, grant.expires_in / 10)
            self._tokens[key] = _Cached(header, self._clock() + grant.expires_in - margin)
            log.debug("token for %s scope %s, valid %d s", registry, scope, grant.expires_in)
            return header

    def refused(self, registry: str, scope: str, response: httpx.Response) -> Exception:
        """The error for a request still answered 401/403 after authenticating.

        Returns (does not raise) `AuthenticationError` when we had no credentials or they
        were rejected, `AccessDeniedError` for 403 or ``insufficient_scope`` with credentials.
        """
        self._tokens.pop(self._token_key(registry, scope), None)
        try:
            has_credentials = self.credentials(registry) is not None
        except UnsupportedCredentialsError:  # already reported when the header was built
            has_credentials = False
        error = None
        if response.status_code == 401:
            try:
                found = parse_www_authenticate(response.headers.get_list("www-authenticate"))
            except ChallengeParseError:
                found = []
            error = next((c.error for c in found if c.error), None)
        if not has_credentials:
            return AuthenticationError(
                f"{registry}: anonymous access to {scope} refused (HTTP "
                f"{response.status_code}); configure credentials for {registry}"
            )
        if response.status_code == 403 or error == "insufficient_scope":
            return AccessDeniedError(
                f"{registry}: the configured credentials are not allowed {scope} "
                f"(HTTP {response.status_code})"
            )
        return AuthenticationError(f"{registry}: the configured credentials were rejected")


def _pick_challenge(registry: str, response: httpx.Response) -> Challenge:
    try:
        challenges = parse_www_authenticate(response.headers.get_list("www-authenticate"))
    except ChallengeParseError as exc:
        raise AuthenticationError(f"{registry}: unusable 401 challenge: {exc}") from None
    for scheme in ("bearer", "basic"):
        for challenge in challenges:
            if challenge.scheme == scheme and (scheme == "basic" or challenge.realm):
                return challenge
    offered = ", ".join(c.scheme for c in challenges) or "none"
    raise AuthenticationError(
        f"{registry}: answered 401 without a Bearer (with realm) or Basic challenge "
        f"(offered: {offered})"
    )


async def _fetch_token(
    http: httpx.AsyncClient,
    registry: str,
    challenge: Challenge,
    scope: str,
    credentials: Credentials | None,
    allow_plain_http: bool,
) -> TokenGrant:
    realm = challenge.realm or ""
    url = httpx.URL(realm)
    if url.scheme not in ("https", "http") or not url.host:
        raise AuthenticationError(f"{registry}: token realm {realm!r} is not an http(s) URL")
    if url.scheme == "http" and credentials is not None and not allow_plain_http:
        raise AuthenticationError(
            f"{registry}: refusing to send credentials to plain-HTTP token realm {realm}"
        )
    scopes = [scope] if scope else []
    if challenge.scope:
        scopes += [s for s in challenge.scope.split() if s not in scopes]
    params: list[tuple[str, str | int | float | bool | None]] = []
    if challenge.service:
        params.append(("service", challenge.service))
    params += [("scope", s) for s in scopes]
    headers = {"Accept": "application/json"}
    if credentials is not None:
        headers["Authorization"] = credentials.basic_authorization()
    where = f"token server {url.scheme}://{url.netloc.decode()}{url.path}"
    try:
        response = await http.get(url, params=params, headers=headers)
    except httpx.RequestError as exc:
        raise RegistryConnectionError(f"{where}: {exc.__class__.__name__}: {exc}") from None
    status = response.status_code
    if status in (401, 403):
        who = "the configured credentials" if credentials else "anonymous access"
        raise AuthenticationError(f"{where} refused {who} for {registry} (HTTP {status})")
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if status == 429:
        raise RateLimitedError(where, retry_after)
    if status >= 500:
        raise ServerError(status, where, retry_after)
    if status != 200:
        raise RegistryStatusError(status, where)
    if len(response.content) > MAX_TOKEN_RESPONSE:
        raise AuthenticationError(f"{where}: token answer larger than {MAX_TOKEN_RESPONSE} bytes")
    return parse_token_response(response.content, where)
