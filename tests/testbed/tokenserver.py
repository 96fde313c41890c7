"""A small token service for the token-auth registry, after distribution's token spec.

Follows distribution's `docs/spec/auth/token.md` (the `GET /token` exchange) and `jwt.md`
(the token's claims), as the Debian `docker-registry` 2.8 verifies them
(`registry/auth/token/token.go`):

* `GET /token?service=S&scope=repository:NAME:pull,push[&scope=…]`, optionally with HTTP
  basic credentials. Wrong credentials → 401. No credentials → the anonymous grants (none
  by default): the spec makes a partial or empty grant a token, not an error, so the
  registry is the one that refuses the request (401 `insufficient_scope`).
* The answer is `{"token", "access_token", "expires_in", "issued_at"}`; the token is an
  ES256 JWT with `iss`, `sub`, `aud` (= the requested service, as one string: 2.8 reads
  `aud` as a string), `exp`, `nbf`, `iat`, `jti` and `access` = the requested actions
  intersected with the user's grants.
* The registry finds the signing key through the JWT header's `x5c` (the signing
  certificate, standard base64 DER) and verifies that chain against its `rootcertbundle`,
  so the bundle is the bed's CA certificate and the signing certificate is issued by it.

Users and grants come from a YAML (or JSON) file, see `Config.load`; the running server
reads it again when it changes (`set_users`: tests add accounts with narrower grants). Run
it with `python -m testbed.tokenserver --listen 127.0.0.1:PORT --config FILE`; it serves
HTTPS only. `start_token_server` writes such a file and starts the process for the bed.
Each token is logged as ``token for 'USER': requested [SCOPES] granted [ACCESS]``.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import fnmatch
import hmac
import logging
import ssl
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import yaml
from aiohttp import BasicAuth, web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from testbed import pki, procs

#: Lifetime of issued tokens in seconds; the spec asks for at least 60.
DEFAULT_EXPIRES_IN = 300
#: The `service` (token audience) and `issuer` the bed's registry is configured with.
SERVICE = "layercache-testbed-registry"
ISSUER = "layercache-testbed-tokenserver"
READY_TIMEOUT = 20.0

log = logging.getLogger("testbed.tokenserver")


@dataclass(frozen=True)
class Grant:
    """Actions allowed on resources of `type` whose name matches the glob `name`."""

    type: str
    name: str
    actions: frozenset[str]

    def allows(self, rtype: str, name: str) -> frozenset[str]:
        """The actions this grant allows on resource `rtype:name` (empty if none)."""
        if rtype == self.type and fnmatch.fnmatchcase(name, self.name):
            return self.actions
        return frozenset()


@dataclass(frozen=True)
class User:
    """An account of the token server: name, clear-text password (a test bed) and grants."""

    name: str
    password: str
    grants: tuple[Grant, ...]


@dataclass(frozen=True)
class Config:
    """Everything the server needs; see `load` for the file format."""

    issuer: str
    service: str
    signing_cert: Path
    signing_key: Path
    tls_cert: Path
    tls_key: Path
    users: dict[str, User]
    anonymous: tuple[Grant, ...] = ()
    expires_in: int = DEFAULT_EXPIRES_IN

    @classmethod
    def load(cls, path: Path) -> Config:
        """Read a config file (YAML; JSON is YAML too).

        Shape::

            issuer: layercache-testbed-tokenserver
            service: layercache-testbed-registry      # the only audience served
            signing_cert: sign.crt                     # EC P-256, issued by the registry's CA
            signing_key: sign.key
            tls_cert: tls.crt                          # HTTPS certificate and key
            tls_key: tls.key
            expires_in: 300                            # seconds, >= 60
            users:
              - name: alice
                password: secret
                access: [{type: repository, name: "*", actions: [pull, push]}]
            anonymous: [{type: repository, name: "public/*", actions: [pull]}]

        Relative paths are relative to the file. `name` in a grant is a glob (`*` matches `/`).

        Raises:
            ValueError: a missing or malformed field.
            OSError: the file cannot be read.

        """
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping")
        base = path.parent
        try:
            users = {
                u["name"]: User(u["name"], str(u["password"]), _grants(u.get("access", [])))
                for u in raw.get("users", [])
            }
            expires_in = int(raw.get("expires_in", DEFAULT_EXPIRES_IN))
            if expires_in < 60:
                raise ValueError("expires_in must be at least 60 seconds (token spec)")
            return cls(
                issuer=raw["issuer"], service=raw["service"],
                signing_cert=base / raw["signing_cert"], signing_key=base / raw["signing_key"],
                tls_cert=base / raw["tls_cert"], tls_key=base / raw["tls_key"],
                users=users, anonymous=_grants(raw.get("anonymous", [])),
                expires_in=expires_in,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: missing or malformed field {exc}") from exc


def _grants(items: list[dict[str, Any]]) -> tuple[Grant, ...]:
    return tuple(Grant(str(g["type"]), str(g["name"]), frozenset(map(str, g["actions"])))
                 for g in items)


def parse_scopes(scopes: Sequence[str]) -> list[tuple[str, str, frozenset[str]]]:
    """Parse `scope` query values into (type, name, actions).

    Each value is `type:name:action[,action…]` (distribution `docs/spec/auth/scope.md`);
    a value may hold several space-separated scopes. The name may itself contain `:`
    (a registry host with a port), so the type is cut at the first `:` and the actions at
    the last. A type with a class, `repository(plugin)`, keeps the class in the type.

    Raises:
        ValueError: a scope without three parts.

    """
    parsed = []
    for value in scopes:
        for scope in value.split():
            rtype, sep1, rest = scope.partition(":")
            name, sep2, actions = rest.rpartition(":")
            if not (sep1 and sep2 and rtype and name):
                raise ValueError(f"malformed scope {scope!r}")
            parsed.append((rtype, name, frozenset(a for a in actions.split(",") if a)))
    return parsed


def granted_access(grants: Sequence[Grant], requested: Sequence[tuple[str, str, frozenset[str]]],
                   ) -> list[dict[str, object]]:
    """The JWT `access` claim: each requested resource with requested ∩ granted actions.

    Resources left with no action are omitted; the spec makes that a smaller token, not an
    error. Shape: `[{"type": "repository", "name": "a/b", "actions": ["pull"]}]`.
    """
    access: list[dict[str, object]] = []
    for rtype, name, actions in requested:
        allowed: set[str] = set()
        for grant in grants:
            allowed |= grant.allows(rtype, name)
        # A grant of "*" (all actions) lets every requested action through.
        ok = actions if "*" in allowed else actions & allowed
        if ok:
            access.append({"type": rtype, "name": name, "actions": sorted(ok)})
    return access


class Signer:
    """Signs registry tokens with an EC P-256 key and names its certificate in `x5c`."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._key = serialization.load_pem_private_key(key.read_bytes(), password=None)
        der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
            serialization.Encoding.DER)
        # RFC 7515 §4.1.6: x5c holds standard (not URL-safe) base64 of DER certificates.
        self._x5c = [base64.b64encode(der).decode()]

    def sign(self, claims: dict[str, object]) -> str:
        """Return the compact JWS (ES256) of `claims`."""
        return jwt.encode(claims, self._key, algorithm="ES256",  # type: ignore[arg-type]
                          headers={"x5c": self._x5c})


def make_app(config: Config, path: Path | None = None) -> web.Application:
    """The aiohttp application serving `GET /token` for `config`.

    With `path` (the file `config` came from), users and grants are read again whenever
    the file's modification time changes; the signing key stays the one loaded first.
    """
    signer = Signer(config.signing_cert, config.signing_key)
    loaded = {"mtime": path.stat().st_mtime_ns if path else 0}

    def current() -> Config:
        nonlocal config
        if path is not None and (mtime := path.stat().st_mtime_ns) != loaded["mtime"]:
            config, loaded["mtime"] = Config.load(path), mtime
        return config

    async def token(request: web.Request) -> web.Response:
        config = current()
        service = request.query.get("service", "")
        if service != config.service:
            return _error(400, "UNSUPPORTED", f"unknown service {service!r}")
        try:
            requested = parse_scopes(request.query.getall("scope", []))
        except ValueError as exc:
            return _error(400, "INVALID_SCOPE", str(exc))
        subject, grants = "", config.anonymous
        if header := request.headers.get("Authorization"):
            try:
                creds = BasicAuth.decode(header)
            except ValueError:
                return _error(401, "UNAUTHORIZED", "only basic credentials are accepted")
            user = config.users.get(creds.login)
            # Compare in constant time even though this is a test bed: it costs nothing.
            if user is None or not hmac.compare_digest(user.password.encode(),
                                                       creds.password.encode()):
                return _error(401, "UNAUTHORIZED", "invalid username or password")
            subject, grants = user.name, user.grants
        access = granted_access(grants, requested)
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        claims = {
            "iss": config.issuer, "sub": subject, "aud": service,
            "exp": now + datetime.timedelta(seconds=config.expires_in),
            "nbf": now, "iat": now, "jti": uuid.uuid4().hex, "access": access,
        }
        signed = signer.sign(claims)
        log.info("token for %r: requested %s granted %s", subject or "<anonymous>",
                 sorted(request.query.getall("scope", [])), access)
        return web.json_response({
            "token": signed, "access_token": signed, "expires_in": config.expires_in,
            "issued_at": now.isoformat().replace("+00:00", "Z"),
        })

    app = web.Application()
    app.router.add_get("/token", token)
    return app


def _error(status: int, code: str, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Basic realm="layercache-testbed"'} if status == 401 else {}
    return web.json_response({"errors": [{"code": code, "message": message}]},
                             status=status, headers=headers)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `--listen HOST:PORT --config FILE`; serves HTTPS until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m testbed.tokenserver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve HTTPS on")
    parser.add_argument("--config", required=True, type=Path, help="YAML/JSON config file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = Config.load(args.config)
    host, _, port = args.listen.rpartition(":")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(config.tls_cert, config.tls_key)
    web.run_app(make_app(config, args.config), host=host, port=int(port), ssl_context=tls,
                print=None)


# --- Running it for the bed ------------------------------------------------------------


@dataclass
class TokenServer:
    """A running token server process.

    `realm` is the token endpoint URL (`https://127.0.0.1:PORT/token`) for the registry's
    `auth.token.realm`; `ca_file` is the CA that issued both its TLS and signing certificates
    (the registry's `rootcertbundle`, and the trust root clients need).
    """

    realm: str
    service: str
    issuer: str
    ca_file: Path
    config: Path
    log: Path
    process: procs.Process = field(repr=False)

    @property
    def pid(self) -> int:
        """PID (and process-group ID) of the server."""
        return self.process.pid

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        self.process.stop()


def start_token_server(workdir: Path, ca: pki.CA, users: Sequence[User], *,
                       anonymous: Sequence[Grant] = (), service: str = SERVICE,
                       issuer: str = ISSUER, ready_timeout: float = READY_TIMEOUT,
                       address: str = "127.0.0.1") -> TokenServer:
    """Write a config for `users` into `workdir`, start the server, wait until it answers.

    It listens on `address`. The TLS certificate (SANs 127.0.0.1, `address`, localhost) and
    the signing certificate are issued
    by `ca` into its directory as `tokenserver-PORT.*` and `token-signer-PORT.*`.
    Ready means `GET /token?service=…` returns 200 over verified TLS.

    Raises:
        procs.ComponentError: the server exited or was not ready in `ready_timeout` seconds
            (it is stopped first).

    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    tls = ca.issue(f"tokenserver-{port}", address,
                   hosts=(*dict.fromkeys(("127.0.0.1", address)), "localhost"))
    signing = ca.issue(f"token-signer-{port}", issuer, client=True)
    config = workdir / "tokenserver.yaml"
    config.write_text(yaml.safe_dump({
        "issuer": issuer, "service": service,
        "signing_cert": str(signing.cert), "signing_key": str(signing.key),
        "tls_cert": str(tls.cert), "tls_key": str(tls.key),
        "users": [{"name": u.name, "password": u.password,
                   "access": [_grant_dict(g) for g in u.grants]} for u in users],
        "anonymous": [_grant_dict(g) for g in anonymous],
    }))
    config.chmod(0o600)  # clear-text passwords
    logfile = workdir / "tokenserver.log"
    process = procs.Process(
        "tokenserver",
        [sys.executable, "-m", "testbed.tokenserver", "--listen", f"{address}:{port}",
         "--config", config],
        log=logfile, cwd=workdir,
    ).start()
    server = TokenServer(f"https://{address}:{port}/token", service, issuer, ca.cert, config,
                         logfile, process)
    context = ssl.create_default_context(cafile=ca.cert)

    def ready() -> bool:
        reply = httpx.get(server.realm, params={"service": service}, verify=context, timeout=2)
        return reply.status_code == 200

    try:
        process.wait_ready(ready, ready_timeout)
    except BaseException:
        process.stop()
        raise
    return server


def set_users(config: Path, users: Sequence[User], remove: Sequence[str] = ()) -> None:
    """Add (or replace, by name) `users` in a running server's `config` file; drop `remove`.

    The server picks the change up at its next request. The file is replaced atomically,
    so the server never reads half of it.
    """
    raw = yaml.safe_load(config.read_text())
    names = {u.name for u in users} | set(remove)
    raw["users"] = [u for u in raw.get("users", []) if u["name"] not in names] + [
        {"name": u.name, "password": u.password, "access": [_grant_dict(g) for g in u.grants]}
        for u in users]
    staged = config.with_suffix(".new")
    staged.write_text(yaml.safe_dump(raw))
    staged.chmod(0o600)  # clear-text passwords
    staged.replace(config)


def _grant_dict(grant: Grant) -> dict[str, object]:
    return {"type": grant.type, "name": grant.name, "actions": sorted(grant.actions)}


if __name__ == "__main__":
    main()
