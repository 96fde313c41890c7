"""The ``layercache`` command line (also ``kubectl layercache``): plan, status, operator, agent.

``layercache status [NAME]`` shows LayerCache status read from the API: one row per cache,
or one cache with per-node progress bars and its savings (`layercache.cli.statusview`,
`layercache.cli.statusapi`; docs/cli.md).

``layercache plan IMAGE… [--file F]`` resolves every image for one platform (concurrently,
through `layercache.registry`), lists the layers two or more of them share, and runs the
planner's savings model for ``--nodes`` identical empty nodes: what pulling image by image
would fetch, versus each distinct layer crossing the upstream link once. Any image that
cannot be resolved is reported on stderr and makes the exit status 1; the others are still
planned and printed.

Output: ``table`` (for people), ``json`` and ``yaml`` (for scripts; sizes in bytes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from layercache.oci.platform import InvalidPlatformError, Platform, parse_platform

if TYPE_CHECKING:
    from layercache.registry import Keyring, RegistryOptions, ResolvedImage

from layercache.units import human_bytes

__all__ = ["app"]

app = typer.Typer(
    name="layercache",
    help="Plan, pre-pull and de-duplicate shared container-image layers across nodes.",
    no_args_is_help=True,
    add_completion=False,
)

#: Exit status when some image could not be resolved (usage errors exit 2, as typer does).
EXIT_UNRESOLVED = 1
#: Columns of `layercache status` tables written to a pipe without $COLUMNS.
PIPE_WIDTH = 200


class OutputFormat(StrEnum):
    """``--output`` choices."""

    table = "table"
    json = "json"
    yaml = "yaml"


@dataclass(frozen=True)
class Failure:
    """An image that could not be resolved: its reference as given and why."""

    reference: str
    error: BaseException


def _print_version(value: bool) -> None:
    """``--version``: print ``layercache X.Y.Z`` (the installed distribution's version) and exit.

    The version comes from the package metadata (`importlib.metadata`), so it is the one in
    pyproject.toml that pip/pipx installed, not a second copy kept in the source.
    """
    if value:
        typer.echo(f"layercache {package_version('layercache')}")
        raise typer.Exit


@app.callback()
def main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the installed layercache version and exit.")] = False,
) -> None:
    """Plan, pre-pull and de-duplicate shared container-image layers across nodes."""


@app.command("operator")
def operator_command(
    verbose: Annotated[bool, typer.Option("--verbose", help="kopf debug logging.")] = False,
) -> None:
    """Run the operator; settings come from LAYERCACHE_* variables (docs/configuration.md)."""
    from layercache.controller.main import run_operator  # kopf loads only for this command

    run_operator(verbose=verbose)


@app.command("cleanup")
def cleanup_command(
    timeout: Annotated[float, typer.Option(
        "--timeout", min=1, help="Seconds to wait for every agent to release its layers.")
    ] = 240,
) -> None:
    """Delete every LayerCache; wait until every node released its layers (before uninstall).

    The chart's pre-delete hook runs this. Exit 1 when the wait times out.
    """
    from layercache import kubeclient
    from layercache.cli.uninstall import CleanupTimeout, cleanup
    from layercache.controller.kube import KubeApi

    api = kubeclient.api_client()
    try:
        cleanup(KubeApi(api), timeout)
    except CleanupTimeout as error:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(error))}", highlight=False,
                                   soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        api.close()  # type: ignore[no-untyped-call]


@app.command("agent")
def agent_command() -> None:
    """Run the node agent; settings come from LAYERCACHE_* variables (NODE_NAME required)."""
    from layercache.agent.cli import main as agent_main

    agent_main()


def read_image_file(path: Path) -> list[str]:
    """Image references from a file, one per line; blank lines and ``#`` comments skipped.

    ``-`` reads standard input.

    Raises:
        OSError: the file cannot be read.

    """
    text = sys.stdin.read() if str(path) == "-" else path.read_text()
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def default_docker_config() -> Path | None:
    """``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``, if it exists."""
    base = os.environ.get("DOCKER_CONFIG")
    path = Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"
    return path if path.is_file() else None


@app.command("plan")
def plan_command(
    images: Annotated[
        list[str] | None,
        typer.Argument(help="Image references, e.g. nginx:1.27.", show_default=False),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="File of image references, one per line ('-': stdin)."),
    ] = None,
    platform: Annotated[
        str, typer.Option("--platform", help=r"Node platform, os/arch\[/variant].")
    ] = "linux/amd64",
    nodes: Annotated[
        int, typer.Option("--nodes", min=1, help="Identical empty nodes in the savings model.")
    ] = 3,
    min_shared_by: Annotated[
        int,
        typer.Option(
            "--min-shared-by",
            min=1,
            help="Cache only layers used by at least this many of the images "
            "(a LayerCache's spec.minSharedBy).",
        ),
    ] = 1,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="Output format.")
    ] = OutputFormat.table,
    insecure_registry: Annotated[
        list[str] | None,
        typer.Option(
            "--insecure-registry",
            envvar="LAYERCACHE_INSECURE_REGISTRIES",
            help="Registry HOST[:PORT] to reach by plain HTTP (repeat, or comma-separate).",
        ),
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option("--ca-file", exists=True, dir_okay=False, help="Extra CA (PEM) for TLS."),
    ] = None,
    docker_config: Annotated[
        Path | None,
        typer.Option(
            "--docker-config",
            dir_okay=False,
            help="Docker config JSON with credentials (default: ~/.docker/config.json).",
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Concurrent requests per registry.")
    ] = 8,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log retries.")] = False,
) -> None:
    """Resolve IMAGEs, show the layers they share and the savings for N empty nodes."""
    # The registry client (httpx, h2) loads only for this command: `status` starts faster.
    from layercache.oci.reference import InvalidReferenceError
    from layercache.registry import DockerConfig, Keyring
    from layercache.registry.client import registry_options
    from layercache.registry.credentials import InvalidDockerConfigError

    err = Console(stderr=True)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request URL at INFO; redirect URLs to blob storage carry signatures.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        wanted = parse_platform(platform)
        references = list(images or [])
        if file is not None:
            references += read_image_file(file)
        config_path = docker_config or default_docker_config()
        keyring = Keyring([DockerConfig.from_file(config_path)] if config_path is not None else [])
    except (InvalidPlatformError, InvalidDockerConfigError, OSError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    references = list(dict.fromkeys(references))
    if not references:
        err.print("[red]error:[/red] no images given (arguments or --file)", highlight=False)
        raise typer.Exit(2)
    try:
        options, default = registry_options(
            insecure_registry or [], ca_file=ca_file, max_concurrency=concurrency
        )
    except InvalidReferenceError as exc:
        err.print(f"[red]error:[/red] --insecure-registry (LAYERCACHE_INSECURE_REGISTRIES): "
                  f"{escape(str(exc))}",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    resolved, failures = asyncio.run(
        _resolve_all(references, wanted, keyring, options, default, err)
    )
    report = build_report(resolved, failures, wanted, nodes, min_shared_by)
    if output is OutputFormat.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    elif output is OutputFormat.yaml:
        sys.stdout.write(yaml.safe_dump(report, sort_keys=False))
    else:
        print_tables(Console(), report)
    for failure in failures:
        err.print(
            f"[red]error:[/red] {escape(failure.reference)}: {escape(str(failure.error))}",
            highlight=False,
            soft_wrap=True,
        )
    if failures:
        raise typer.Exit(EXIT_UNRESOLVED)


async def _resolve_all(
    references: Sequence[str],
    wanted: Platform,
    keyring: Keyring,
    options: dict[str, RegistryOptions],
    default: RegistryOptions,
    err: Console,
) -> tuple[list[ResolvedImage], list[Failure]]:
    """Resolve every reference concurrently; results in input order, failures apart."""
    from layercache.oci.reference import InvalidReferenceError, Reference, parse_reference
    from layercache.registry import RegistryClient, ResolvedImage, resolve

    parsed: dict[str, Reference] = {}
    failures: list[Failure] = []
    for text in references:
        try:
            parsed[text] = parse_reference(text)
        except InvalidReferenceError as exc:
            failures.append(Failure(text, exc))
    progress = Progress(
        TextColumn("resolving"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    async with RegistryClient(keyring=keyring, registries=options, default=default) as client:
        with progress:
            task = progress.add_task("resolve", total=len(parsed))

            async def one(reference: Reference) -> ResolvedImage:
                try:
                    return await resolve(client, reference, wanted)
                finally:
                    progress.advance(task)

            results = await asyncio.gather(
                *(one(ref) for ref in parsed.values()), return_exceptions=True
            )
    resolved: list[ResolvedImage] = []
    for text, result in zip(parsed, results, strict=True):
        if isinstance(result, ResolvedImage):
            resolved.append(result)
        elif isinstance(result, Exception):
            failures.append(Failure(text, result))
        else:
            raise result  # KeyboardInterrupt, CancelledError: not ours to report
    return resolved, failures


def build_report(
    images: Sequence[ResolvedImage],
    failures: Iterable[Failure],
    platform: Platform,
    nodes: int,
    min_shared_by: int = 1,
) -> dict[str, Any]:
    """The plan report as JSON-ready data (sizes in bytes).

    Shape: ``platform``, ``nodes``, ``min_shared_by``; ``images`` (reference, digest, media
    type, manifest, layers with digest/size/mediaType/diffID); ``shared_layers`` (layers used
    by two or more of the images: digest, size, shared_by = images, manifests = distinct manifests,
    images), most shared and largest first, and ``shared_bytes`` (their total); ``savings``
    (the planner's model for ``nodes`` identical empty nodes holding the layers used by at
    least ``min_shared_by`` images: naive and saved count only those layers, see
    `layercache.plan.planner.Savings`; plus ``saved_upstream_bytes``); ``errors``.
    """
    from layercache.oci.digest import Digest
    from layercache.plan.planner import Node, PlanOptions, plan

    node_list = [Node(name=f"node-{i + 1}", platform=platform) for i in range(nodes)]
    result = plan(
        [image.plan_input() for image in images], node_list, PlanOptions(min_shared_by)
    )
    users: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for image in images:
        for layer in image.layers:
            names = users.setdefault(str(layer.digest), [])
            if str(image.reference) not in names:
                names.append(str(image.reference))
            sizes[str(layer.digest)] = layer.size
    # Shared = used by two or more of the images asked for (references, as given). Two
    # references to one manifest (a tag and the index holding it) count as two images;
    # ``manifests`` says how many distinct manifests use the layer (the planner's count).
    shared_digests = sorted(
        (digest for digest, names in users.items() if len(names) >= 2),
        key=lambda digest: (-len(users[digest]), -sizes[digest], digest),
    )
    shared = [
        {
            "digest": digest,
            "size": sizes[digest],
            "shared_by": len(users[digest]),
            "manifests": result.shared_by[Digest(digest)],
            "images": users[digest],
        }
        for digest in shared_digests
    ]
    savings = result.savings
    return {
        "platform": str(platform),
        "nodes": nodes,
        "min_shared_by": min_shared_by,
        "images": [_image_json(image) for image in images],
        "shared_layers": shared,
        "shared_bytes": sum(sizes[digest] for digest in shared_digests),
        "savings": {
            "naive_bytes": savings.naive_bytes,
            "unique_bytes": savings.unique_bytes,
            "planned_bytes": savings.planned_bytes,
            "expected_upstream_bytes": savings.expected_upstream_bytes,
            "expected_peer_bytes": savings.expected_peer_bytes,
            "saved_upstream_bytes": savings.saved_bytes,
        },
        "errors": [
            {"reference": f.reference, "type": type(f.error).__name__, "message": str(f.error)}
            for f in failures
        ],
    }


def _image_json(image: ResolvedImage) -> dict[str, Any]:
    return {
        "reference": str(image.reference),
        "digest": str(image.digest),
        "media_type": image.media_type,
        "manifest_digest": str(image.manifest_digest),
        "manifest_media_type": image.manifest_media_type,
        "manifest_platform": str(image.manifest_platform),
        "config_digest": str(image.config_digest),
        "layer_bytes": image.layer_bytes,
        "layers": [
            {
                "digest": str(layer.digest),
                "size": layer.size,
                "media_type": layer.media_type,
                "diff_id": str(layer.diff_id),
            }
            for layer in image.layers
        ],
    }


def _short(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}:{encoded[:12]}"


def _table(title: str, *columns: str) -> Table:
    # A trailing "#" marks a numeric column: right-aligned.
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column.rstrip("#"), justify="right" if column.endswith("#") else "left")
    return table


def print_tables(console: Console, report: dict[str, Any]) -> None:
    """Print ``report`` (from `build_report`) as tables for people."""
    registries = {image["reference"].partition("/")[0] for image in report["images"]}
    prefix = f"{registries.pop()}/" if len(registries) == 1 else ""

    def name(reference: str) -> str:
        return reference.removeprefix(prefix)

    where = f" from {prefix.rstrip('/')}" if prefix else ""
    images = _table(
        f"Images{where} ({report['platform']})", "IMAGE", "MANIFEST", "LAYERS#", "SIZE#"
    )
    for image in report["images"]:
        images.add_row(
            name(image["reference"]),
            _short(image["manifest_digest"]),
            str(len(image["layers"])),
            human_bytes(image["layer_bytes"]),
        )
    console.print(images)
    shared = _table("Shared layers", "LAYER", "SIZE#", "IMAGES#", "USED BY")
    for row in report["shared_layers"]:
        shared.add_row(
            _short(row["digest"]),
            human_bytes(row["size"]),
            str(row["shared_by"]),
            ", ".join(name(reference) for reference in row["images"]),
        )
    console.print(shared)
    console.print(f"shared layer bytes: {human_bytes(report['shared_bytes'])}")
    s = report["savings"]
    held_by = "" if report["min_shared_by"] == 1 else (
        f", layers used by {report['min_shared_by']}+ images"
    )
    savings = _table(f"Savings model: {report['nodes']} empty nodes{held_by}", "", "BYTES#")
    naive = s["naive_bytes"]
    rows = [
        ("every node pulls the cached layers itself", naive),
        ("distinct layers (held once per cluster)", s["unique_bytes"]),
        ("expected from upstream (each layer once)", s["expected_upstream_bytes"]),
        ("expected from peers", s["expected_peer_bytes"]),
        ("saved upstream", s["saved_upstream_bytes"]),
    ]
    for label, value in rows:
        savings.add_row(label, human_bytes(value))
    console.print(savings)
    if naive:
        console.print(
            f"upstream traffic: {100 * s['expected_upstream_bytes'] / naive:.1f} % "
            "of each node pulling the cached layers itself"
        )


@app.command("status")
def status_command(
    name: Annotated[
        str | None,
        typer.Argument(help="A LayerCache; without it, one line per LayerCache.",
                       show_default=False),
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", "-n",
                     help="Namespace (default: the kubeconfig context's, else 'default').",
                     show_default=False),
    ] = None,
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="List LayerCaches in every namespace.")
    ] = False,
    kubeconfig: Annotated[
        Path | None,
        typer.Option("--kubeconfig", dir_okay=False,
                     help="Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster).",
                     show_default=False),
    ] = None,
    context: Annotated[
        str | None,
        typer.Option("--context", help="Kubeconfig context (default: the current one).",
                     show_default=False),
    ] = None,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="Output format (json/yaml: raw status).")
    ] = OutputFormat.table,
    stale_after: Annotated[
        float | None,
        typer.Option("--stale-after", min=1,
                     help="Seconds after which a status not rewritten is flagged stale "
                          "(default: the cache's refreshInterval + 120).",
                     show_default=False),
    ] = None,
) -> None:
    """Show LayerCache status: per-node progress and what the cache saved (read-only)."""
    from layercache.cli.statusapi import StatusApi, StatusApiError

    err = Console(stderr=True)
    if name is not None and all_namespaces:
        err.print("[red]error:[/red] a NAME is looked up in one namespace: drop -A",
                  highlight=False)
        raise typer.Exit(2)
    try:
        api = StatusApi(kubeconfig, context)
    except StatusApiError as error:
        err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_UNRESOLVED) from None
    try:
        _status(api, name, None if all_namespaces else namespace or api.default_namespace,
                output, stale_after, err)
    except StatusApiError as error:
        err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_UNRESOLVED) from None
    finally:
        api.close()


def _status(api: Any, name: str | None, namespace: str | None, output: OutputFormat,
            stale_after: float | None, err: Console) -> None:
    """`status_command`'s work on an open `layercache.cli.statusapi.StatusApi`."""
    import datetime

    from layercache.cli import statusview
    from layercache.cli.statusapi import StatusApiError

    now = datetime.datetime.now(datetime.UTC)
    out = Console()
    if not out.is_terminal and "COLUMNS" not in os.environ:
        # rich lays a pipe out at 80 columns and would wrap numbers; kubectl never does.
        out = Console(width=PIPE_WIDTH)
    data: dict[str, Any]
    if name is None:
        caches = api.list_caches(namespace)
        data = statusview.list_json(caches)
        if output is OutputFormat.table:
            if not caches:
                where = f"namespace {namespace}" if namespace else "any namespace"
                err.print(f"No LayerCaches in {where}.", highlight=False)
                return
            statusview.render_list(out, caches, now, stale_after)
            return
    else:
        assert namespace is not None
        cache = api.get_cache(namespace, name)
        nodes: list[dict[str, Any]] | None
        nodes_error = None
        try:
            nodes = api.list_node_caches()
        except StatusApiError as error:  # e.g. may read LayerCaches but not NodeLayerCaches
            nodes, nodes_error = None, str(error)
        data = statusview.cache_json(cache, nodes)
        if output is OutputFormat.table:
            statusview.render_detail(out, cache, nodes, now, stale_after, nodes_error)
            return
    if output is OutputFormat.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
