"""Import directions of the package: lower layers never import higher ones.

Checked on the source (every import, ``TYPE_CHECKING`` ones included), so a cycle or an
inverted edge fails here; the import-linter contracts of ``make lint`` (.importlinter) run
here too.
"""

from __future__ import annotations

import ast
import configparser
import subprocess
import sys
from pathlib import Path

import pytest

import layercache

PACKAGE = Path(layercache.__file__).parent


def _imports(module: str) -> set[str]:
    """Every ``layercache`` module ``module`` (dotted, without ``layercache.``) imports."""
    path = PACKAGE.joinpath(*module.split("."))
    source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name.removeprefix("layercache.") for name in found
            if name.startswith("layercache.")}


@pytest.mark.parametrize(("module", "forbidden"), [
    ("registry.resolve", "plan"),  # the I/O client builds the planner's input types
    ("controller.settings", "registry"),  # settings describe registries, open no clients
    ("agent.settings", "controller"),  # the agent's settings do not lean on the operator's
    ("plan.layerorder", "plan.planner"),  # planner -> layerorder, never back
    ("plan.chains", "plan.planner"),  # planner -> chains, never back
    ("containerd.errors", "registry"),
    ("httprange", "registry"),
    ("redact", "containerd"),
])
def test_no_inverted_import(module: str, forbidden: str) -> None:
    hits = {name for name in _imports(module)
            if name == forbidden or name.startswith(f"{forbidden}.")}
    assert not hits, f"layercache.{module} imports {sorted(hits)}"


@pytest.mark.parametrize("module", ["oci.image", "redact", "httprange", "registryconfig"])
def test_shared_pieces_sit_low(module: str) -> None:
    # The pieces moved down import only the OCI vocabulary, nothing that does I/O.
    assert _imports(module) <= {"oci.digest", "oci.digest.Digest", "oci.platform",
                                "oci.platform.Platform", "oci.reference",
                                "oci.reference.parse_registry_hosts"}


def test_one_digest_mismatch_error() -> None:
    # One class of that name in the package; the registry's name for it is the same object,
    # and what the registry and containerd raise are subclasses of it (one except catches all).
    from layercache import registry
    from layercache.containerd.ingest import ContentDigestMismatchError
    from layercache.oci import digest
    from layercache.registry import errors

    defined = [path for path in PACKAGE.rglob("*.py")
               if "class DigestMismatchError(" in path.read_text()]
    assert defined == [PACKAGE / "oci" / "digest.py"]
    assert registry.DigestMismatchError is errors.DigestMismatchError is digest.DigestMismatchError
    assert issubclass(errors.RegistryDigestMismatchError, digest.DigestMismatchError)
    assert issubclass(errors.RegistryDigestMismatchError, errors.RegistryError)
    assert issubclass(ContentDigestMismatchError, digest.DigestMismatchError)


def test_one_kubernetes_client_factory_one_timeout_policy() -> None:
    # Only layercache.kubeclient builds an ApiClient or loads a kubeconfig; every process
    # takes its timeouts from there.
    from layercache import kubeclient
    from layercache.agent import kubeapi
    from layercache.cli import statusapi

    builders = ("ApiClient(", "load_kube_config(", "load_incluster_config(",
                "new_client_from_config(")
    found = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if any(b in path.read_text() for b in builders))
    assert found == ["kubeclient.py"]
    assert (kubeclient.CONNECT_TIMEOUT, kubeclient.REQUEST_TIMEOUT,
            kubeclient.INTERACTIVE_TIMEOUT, kubeclient.WATCH_SECONDS) == (10.0, 30.0, 15.0, 300)
    assert statusapi.REQUEST_TIMEOUT == kubeclient.INTERACTIVE_TIMEOUT
    assert kubeapi.WATCH_SECONDS == kubeclient.WATCH_SECONDS


def test_import_contracts_kept() -> None:
    # The contracts in .importlinter (what `make lint` runs), here too so that the unit
    # tests catch an import across a layer; each contract is explained in the docs.
    config = PACKAGE.parents[1] / ".importlinter"
    contracts = configparser.ConfigParser()
    contracts.read(config)
    names = [contracts[s]["name"] for s in contracts.sections() if ":contract:" in s]
    assert len(names) == 6
    architecture = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text()
    assert [name for name in names if name not in architecture] == []
    # A process of its own: import-linter's CLI reconfigures logging (dictConfig disables
    # every existing logger), which would silence the loggers later tests capture.
    run = subprocess.run([Path(sys.executable).with_name("lint-imports"), "--config", config,
                          "--no-logo"], cwd=config.parent, capture_output=True, text=True,
                         check=False, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6 kept, 0 broken" in run.stdout


def test_one_class_name_one_meaning() -> None:
    # No two classes of the package share a name (the generated gRPC stubs aside): a
    # reader who sees `WantedChain` or `DiskFigures` knows which one it is.
    import re

    defined: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if "protos" in path.parts:
            continue
        for name in re.findall(r"^class (\w+)", path.read_text(), re.MULTILINE):
            defined.setdefault(name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: paths for name, paths in defined.items() if len(paths) > 1} == {}
