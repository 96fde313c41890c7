"""The real Debian `docker-registry` (distribution 2.8) on loopback, in three flavours.

* `plain`: HTTP, no authentication.
* `basic`: HTTP with htpasswd basic authentication (bcrypt, the only hash 2.8 accepts).
* `token`: HTTPS (a certificate from the bed's CA) with bearer-token authentication against
  our token server (`testbed.tokenserver`), which is started with it and stopped with it.

Each registry keeps its blobs under its own work directory (filesystem driver, deletes
enabled so tests can remove manifests and blobs). Configuration keys follow distribution's
`docs/configuration.md` for 2.8.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import httpx
import yaml

from testbed import pki, procs, tokenserver
from testbed.paths import tool

Flavour = Literal["plain", "basic", "token"]
FLAVOURS: tuple[Flavour, ...] = get_args(Flavour)
#: The account created in the `basic` and `token` flavours.
USERNAME = "layercache"
#: Seconds a registry may take to answer `GET /v2/` (it usually takes well under one).
READY_TIMEOUT = 20.0


@dataclass
class Registry:
    """A running registry.

    `host` is what image references use (`127.0.0.1:PORT/repo:tag`), `url` the API base
    (`http://127.0.0.1:PORT` or `https://…`). `username`/`password` are None for `plain`.
    For `token`, `ca_file` is the CA certificate that signed the registry's and the token
    server's TLS certificates, `cert_dir` a directory holding only that file (the layout
    skopeo's `--src-cert-dir`/`--dest-cert-dir` expect: a stray `*.key` there is an error),
    and `token_server` the token service the registry sends clients to.
    """

    flavour: Flavour
    host: str
    url: str
    root: Path
    log: Path
    process: procs.Process = field(repr=False)
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_dir: Path | None = None
    token_server: tokenserver.TokenServer | None = None

    @property
    def pids(self) -> list[int]:
        """PIDs (each also a process-group ID) of the registry and its token server."""
        pids = [self.process.pid]
        if self.token_server is not None:
            pids.append(self.token_server.pid)
        return pids

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What httpx's `verify=` needs for this registry: the CA's context, or True."""
        if self.ca_file is None:
            return True
        return ssl.create_default_context(cafile=self.ca_file)

    def stop(self) -> None:
        """Stop the registry and, for `token`, its token server (idempotent)."""
        self.process.stop()
        if self.token_server is not None:
            self.token_server.stop()


def start_registry(flavour: Flavour, workdir: Path, ca: pki.CA | None = None, *,
                   username: str = USERNAME, password: str | None = None,
                   ready_timeout: float = READY_TIMEOUT, address: str = "127.0.0.1") -> Registry:
    """Start one registry of `flavour` with its state under `workdir` and wait until it answers.

    `password` defaults to a fresh random one (`basic`, `token`). The `token` flavour needs
    `ca` and starts a token server under `workdir/tokenserver` granting `username` pull and
    push on every repository and anonymous clients nothing. Ready means `GET /v2/` answers
    200 or 401. `address`: the IP it (and its token server) listens on; a kubelet bed's is
    its bridge's (`testbed.podnet`), so nodes and pods reach it.

    Raises:
        ValueError: unknown flavour, or `token` without `ca`.
        procs.ComponentError: the registry or token server exited or was not ready in
            `ready_timeout` seconds; everything this call started is stopped first.
        paths.MissingToolError: `docker-registry` or `htpasswd` is not installed.

    """
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown registry flavour {flavour!r}; expected one of {FLAVOURS}")
    if flavour == "token" and ca is None:
        raise ValueError("the token flavour needs a CA for its TLS and signing certificates")
    workdir.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    root = workdir / "storage"
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
            # The default purges uploads older than a week every 24 h; nothing to purge here.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        # A fixed secret keeps upload state valid across requests (a random one is
        # generated per start otherwise and logged as a warning).
        "http": {"addr": f"{address}:{port}", "secret": secrets.token_hex(16)},
    }
    registry = Registry(flavour, f"{address}:{port}", f"http://{address}:{port}", root,
                        workdir / "registry.log", process=procs.Process(
                            f"docker-registry-{flavour}",
                            [tool("docker-registry"), "serve", workdir / "config.yml"],
                            log=workdir / "registry.log", cwd=workdir))
    if flavour != "plain":
        registry.username = username
        registry.password = password or secrets.token_urlsafe(16)
    try:
        if flavour == "basic":
            config["auth"] = {"htpasswd": {"realm": "layercache-testbed",
                                           "path": str(_htpasswd(workdir, username,
                                                                 registry.password))}}
        elif flavour == "token":
            assert ca is not None
            _configure_token(registry, config, workdir, ca)
        (workdir / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        registry.process.start()
        verify = registry.ssl_context()
        registry.process.wait_ready(
            lambda: httpx.get(f"{registry.url}/v2/", verify=verify,
                              timeout=2).status_code in (200, 401),
            ready_timeout)
    except BaseException:
        registry.stop()
        raise
    return registry


def _htpasswd(workdir: Path, username: str, password: str | None) -> Path:
    assert password is not None
    path = workdir / "htpasswd"
    # -i reads the password from stdin, so it never shows in a process listing.
    path.write_text(procs.run([tool("htpasswd"), "-niB", username],
                              input=password.encode()))
    return path


def _configure_token(registry: Registry, config: dict[str, object], workdir: Path,
                     ca: pki.CA) -> None:
    """Start the token server, switch `registry` to HTTPS and point its auth at the server."""
    assert registry.username is not None and registry.password is not None
    address, _, port = registry.host.rpartition(":")
    tls = ca.issue(f"registry-{port}", address,
                   hosts=(*dict.fromkeys(("127.0.0.1", address)), "localhost"))
    registry.url = f"https://{registry.host}"
    registry.ca_file = ca.cert
    registry.cert_dir = workdir / "certs.d"
    registry.cert_dir.mkdir(exist_ok=True)
    shutil.copyfile(ca.cert, registry.cert_dir / "ca.crt")
    user = tokenserver.User(registry.username, registry.password, (
        tokenserver.Grant("repository", "*", frozenset({"pull", "push", "delete"})),
        tokenserver.Grant("registry", "catalog", frozenset({"*"})),
    ))
    server = tokenserver.start_token_server(workdir / "tokenserver", ca, [user],
                                            address=address)
    registry.token_server = server
    http = config["http"]
    assert isinstance(http, dict)
    http["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}
    config["auth"] = {"token": {"realm": server.realm, "service": server.service,
                                "issuer": server.issuer,
                                "rootcertbundle": str(server.ca_file)}}


@contextlib.contextmanager
def registries(workdir: Path, ca: pki.CA | None,
               flavours: Sequence[Flavour] = FLAVOURS) -> Iterator[dict[str, Registry]]:
    """Start one registry per flavour under `workdir/<flavour>`; stop them all on exit.

    Yields `{flavour: Registry}` once every registry answers `GET /v2/`. If one fails to
    start, those already running are stopped before the error propagates. `ca` may be None
    when `token` is not among `flavours`.

    Raises:
        ValueError: an unknown flavour, or `token` without `ca` (checked before anything
            starts).
        procs.ComponentError: a registry or the token server did not come up.

    """
    unknown = [f for f in flavours if f not in FLAVOURS]
    if unknown:
        raise ValueError(f"unknown registry flavours {unknown}; expected some of {FLAVOURS}")
    if "token" in flavours and ca is None:
        raise ValueError("the token flavour needs a CA for its TLS and signing certificates")
    running: dict[str, Registry] = {}
    try:
        for flavour in flavours:
            running[flavour] = start_registry(flavour, workdir / flavour, ca)
        yield running
    finally:
        for registry in running.values():
            registry.stop()
