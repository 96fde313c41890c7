"""`python -m testbed.cli`: the local test bed (up, status, down, demo, load-image), the image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from testbed.bed import BedState, TestBed, stop_bed
from testbed.paths import CONTAINERD_ENV, CONTAINERD_PROFILES, DEFAULT_CONTAINERD, MissingToolError
from testbed.procs import ComponentError
from testbed.status import check

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
console = Console()
DirOption = Annotated[Path, typer.Option("--dir", help="Where the bed keeps its state.",
                                         envvar="LAYERCACHE_TESTBED_DIR")]
DEFAULT_DIR = Path("/tmp/layercache-testbed")


@app.command()
def up(directory: DirOption = DEFAULT_DIR,
       nodes: Annotated[int, typer.Option(min=1, max=50, help="Simulated nodes.")] = 3,
       images: Annotated[bool, typer.Option(help="Build and push the image family.")] = True,
       containerd: Annotated[str | None, typer.Option(
           envvar=CONTAINERD_ENV, show_default=DEFAULT_CONTAINERD,
           help=f"The nodes' containerd: one of {', '.join(CONTAINERD_PROFILES)}.")] = None,
       kubelets: Annotated[bool, typer.Option(
           help="Make each node a kind-like node: own namespaces, a kubelet (registers its "
                "own Node), a pod network and kube-proxy; the apiserver and registries then "
                "listen on the bed bridge (docs/testbed.md).",
       )] = False,
       ) -> None:
    """Start the bed and leave it running; prints how to use it."""
    try:
        state = TestBed(directory, nodes, seed_images=images, containerd=containerd,
                        kubelets=kubelets).up()
    except (ComponentError, MissingToolError, RuntimeError, ValueError) as e:
        console.print(f"[red]test bed failed to start[/]: {e}")
        raise typer.Exit(1) from None
    console.print(f"[green]test bed ready[/] in {state.ready_seconds} s "
                  f"({len(state.nodes)} nodes, Kubernetes {state.kubernetes_version}, "
                  f"containerd {state.containerd}"
                  f"{', kubelets' if state.kubelets else ''})")
    console.print(f"  export KUBECONFIG={state.kubeconfig}")
    for reg in state.registries.values():
        console.print(f"  registry {reg.flavour}: {reg.url}")
    for node in state.nodes:
        if node.ns_pid is not None:
            console.print(f"  node {node.name}: {node.ip}, inside: "
                          f"nsenter --target={node.ns_pid} --mount --net --uts -- CMD")
    if state.proxy_url:
        console.print(f"  fault proxy (the upstream clients should use): {state.proxy_url}")


@app.command()
def status(directory: DirOption = DEFAULT_DIR) -> None:
    """Probe every component; exit status 1 unless all are ready."""
    try:
        state = BedState.load(directory)
    except FileNotFoundError:
        console.print(f"[red]no test bed in {directory}[/] (make testbed-up)")
        raise typer.Exit(1) from None
    rows = check(state)
    table = Table("kind", "name", "ready", "detail", title=f"test bed {directory}")
    for row in rows:
        table.add_row(row.kind, row.name, "[green]yes[/]" if row.ready else "[red]no[/]",
                      row.detail)
    console.print(table)
    if not all(r.ready for r in rows):
        raise typer.Exit(1)


@app.command()
def demo(directory: DirOption = Path("/tmp/layercache-demo"),
         report: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path(
             "out/demo-report.json")) -> None:
    """Run layercache on a fresh bed with real images; print and write what it saved."""
    from testbed.demo import run  # the demo pulls in the product; other commands need not

    if (directory / "state.json").exists():
        stop_bed(directory)
    try:
        run(directory, report, console)
    except (ComponentError, MissingToolError, TimeoutError) as e:
        console.print(f"[red]demo failed[/]: {e}")
        console.print(f"logs: {directory}; tear down with: make demo-down")
        raise typer.Exit(1) from None
    console.print(f"report: {report}; the cluster is still up "
                  f"(KUBECONFIG={directory}/control-plane/admin.kubeconfig); make demo-down")


@app.command()
def image(
    out: Annotated[Path, typer.Option(help="Copy the OCI layout and image.json here.")] = Path(
        "out/image"),
    push: Annotated[str | None, typer.Option(
        help="Push to this reference (registry/repo:tag), TLS verified.")] = None,
    directory: Annotated[Path | None, typer.Option(
        "--dir", help="Also push to the plain registry of the running bed in this directory.",
    )] = None,
    rebuild: Annotated[bool, typer.Option(help="Ignore a cached build of this wheel.")] = False,
) -> None:
    """Build layercache's container image without Docker (cached); optionally push it."""
    from testbed.image_build import CommandError, ToolMissingError
    from testbed.product_image import DEFAULT_REFERENCE, build_image, describe, push_image

    try:
        built = build_image(out, rebuild=rebuild)
        console.print(f"[green]image[/] {built.source}: {describe(built)}")
        targets = [(push, True)] if push else []
        if directory is not None:
            plain = BedState.load(directory).registries["plain"].host
            repository = DEFAULT_REFERENCE.split("/", 1)[1]  # layercache/layercache:<tag>
            targets.append((f"{plain}/{repository}", False))
        for reference, tls_verify in targets:
            digest = push_image(built, reference, tls_verify=tls_verify)
            console.print(f"  pushed {reference}@{digest}")
    except FileNotFoundError:
        console.print(f"[red]no test bed in {directory}[/] (make testbed-up)")
        raise typer.Exit(1) from None
    except (CommandError, ToolMissingError) as e:
        console.print(f"[red]image build failed[/]: {e}")
        raise typer.Exit(1) from None


@app.command("load-image")
def load_image_command(directory: DirOption = DEFAULT_DIR) -> None:
    """Build the product image (cached) and import it into every node, as `kind load`."""
    from testbed.chart import load_image
    from testbed.image_build import CommandError, ToolMissingError

    try:
        loaded = load_image(BedState.load(directory))
    except FileNotFoundError:
        console.print(f"[red]no test bed in {directory}[/] (make testbed-up)")
        raise typer.Exit(1) from None
    except (CommandError, ToolMissingError, ComponentError) as e:
        console.print(f"[red]image load failed[/]: {e}")
        raise typer.Exit(1) from None
    console.print(f"[green]loaded[/] {loaded.reference}@{loaded.digest} into "
                  f"{', '.join(loaded.nodes)} (containerd namespace k8s.io)")


@app.command()
def down(directory: DirOption = DEFAULT_DIR) -> None:
    """Stop every process of the bed, unmount its mounts and remove its directory."""
    stopped = stop_bed(directory)
    console.print(f"test bed down: stopped {len(stopped)} processes" if stopped
                  else "test bed down: nothing was running")


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
