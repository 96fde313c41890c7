"""What a user configures about registries, parsed once for the operator, agent and CLI.

``LAYERCACHE_INSECURE_REGISTRIES`` (operator and agent settings) and ``--insecure-registry``
(``layercache plan``) are read by one parser (`layercache.oci.reference.parse_registry_hosts`):
each entry is canonicalised, so ``Reg.Example:05000`` matches images of ``reg.example:5000``
in every process. `registry_options` turns them, with a CA file, into the per-registry
`RegistryOptions` the registry client takes.

Pure data: this module sits below both the settings and the registry client, so settings
need not import a client (and its httpx) to describe registries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from layercache.oci.reference import parse_registry_hosts

__all__ = ["RegistryHostList", "RegistryOptions", "registry_options"]

#: A settings field: a comma-separated list of registry hosts, canonicalised when read
#: (``Reg.Example:05000`` → ``reg.example:5000``) by the one parser `plan`, the operator and
#: the agent share; an entry that is no registry host fails start-up naming the variable and
#: the entry.
RegistryHostList = Annotated[str, AfterValidator(lambda v: ",".join(parse_registry_hosts(v)))]


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach one registry.

    Attributes:
        insecure: speak plain HTTP (no TLS at all). Default False: HTTPS, verified.
        ca_file: PEM file of extra CA certificates trusted for this registry (and its token
            realm), on top of httpx's default roots.
        max_concurrency: concurrent requests to this registry (>= 1), by every client that
            shares a `RegistryHosts` (the first client to reach the host sets it).

    """

    insecure: bool = False
    ca_file: Path | None = None
    max_concurrency: int = 8

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")


def registry_options(
    insecure: str | Iterable[str] = (),
    *,
    ca_file: Path | None = None,
    max_concurrency: int = 8,
) -> tuple[dict[str, RegistryOptions], RegistryOptions]:
    """The registry client's ``registries`` and ``default`` from what a user configures.

    ``insecure``: registry hosts spoken to in plain HTTP, as comma-separated text or a list
    of such (``LAYERCACHE_INSECURE_REGISTRIES``, ``--insecure-registry``), canonicalised by
    `layercache.oci.reference.parse_registry_hosts` so ``Reg.Example:05000`` matches images of
    ``reg.example:5000``. ``ca_file`` is trusted for every other registry.

    Raises:
        InvalidReferenceError: an insecure entry is not a registry host.

    """
    hosts = parse_registry_hosts(insecure)
    return ({host: RegistryOptions(insecure=True, max_concurrency=max_concurrency)
             for host in hosts},
            RegistryOptions(ca_file=ca_file, max_concurrency=max_concurrency))
