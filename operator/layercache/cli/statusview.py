"""Pure: `layercache status` rendered from LayerCache and NodeLayerCache objects (rich).

Input is what the API returns (dicts in the CRDs' camelCase, `manifests/crds/`): a
LayerCache's ``status`` is written by the operator (`layercache.controller.status.cache_status`), a
NodeLayerCache's by its node's agent (`layercache.agent.status.report.StatusBook`). Nothing here
does I/O except printing to the `rich.console.Console` it is given, so a console built
with ``Console()`` prints colour to a terminal and plain text to a pipe or with NO_COLOR
(rich's own rules), and tests render into a recording console at a fixed clock.

Honesty rules: a missing status says so (the operator has not reported yet); a status
for an older generation than the spec says so; a status not rewritten for longer than
the cache's ``refreshInterval`` plus `STALE_GRACE_SECONDS` is flagged stale (a running
operator re-resolves tags every refreshInterval and writes ``lastResolved`` each time, so
an older status means the operator is down, stuck or has lost the cache). Node progress
comes from each node's agent and counts every cache on that node; the view says so
when a node serves more than this cache.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from layercache.api import LayerCacheStatus, NodeLayerCacheSpec, NodeLayerCacheStatus
from layercache.api.conditions import headline_reason
from layercache.api.spec import parse_duration
from layercache.units import human_bytes

__all__ = [
    "STALE_GRACE_SECONDS",
    "NodeRow",
    "age",
    "cache_json",
    "cache_key",
    "list_json",
    "node_rows",
    "render_detail",
    "render_list",
    "stale_notes",
    "status_written",
]

Obj = Mapping[str, Any]

#: Seconds past ``refreshInterval`` before a status that was not rewritten counts as stale
#: (the operator's refresh loop wakes every 15 s, then replans after a debounce and
#: writes status on its next aggregation pass).
STALE_GRACE_SECONDS: Final = 120.0
#: ``refreshInterval``'s CRD default, when a spec leaves it out.
DEFAULT_REFRESH_SECONDS: Final = 600.0
BAR_WIDTH: Final = 20


def _parse_time(text: object) -> datetime.datetime | None:
    """An RFC 3339 timestamp as the API writes it (``2026-11-29T19:00:00Z``), or None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def age(seconds: float) -> str:
    """A duration as kubectl prints ages: ``45s``, ``7m``, ``5h``, ``3d`` (floor)."""
    s = max(int(seconds), 0)
    if s < 120:
        return f"{s}s"
    if s < 120 * 60:
        return f"{s // 60}m"
    if s < 48 * 3600:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def cache_key(obj: Obj) -> str:
    """``namespace/name`` of a LayerCache: the key NodeLayerCache ``spec.caches`` lists."""
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def status_written(obj: Obj) -> datetime.datetime | None:
    """When the object's status was last written, or None if it never was.

    The apiserver records each writer's last update of the status subresource in
    ``metadata.managedFields`` (server-side field management); without those entries
    (a client that strips them), the newest of ``lastResolved`` and the conditions'
    ``lastTransitionTime`` stands in, which can only make the status look older.
    """
    if not obj.get("status"):
        return None
    meta = obj.get("metadata") or {}
    times = [_parse_time(entry.get("time")) for entry in meta.get("managedFields") or ()
             if entry.get("subresource") == "status"]
    if not any(times):
        status = obj["status"]
        times = [_parse_time(status.get("lastResolved"))]
        times += [_parse_time(c.get("lastTransitionTime")) for c in
                  status.get("conditions") or ()]
    found = [t for t in times if t is not None]
    return max(found) if found else None


def _refresh_seconds(obj: Obj) -> float:
    try:
        return parse_duration(str((obj.get("spec") or {}).get("refreshInterval") or "10m"))
    except ValueError:
        return DEFAULT_REFRESH_SECONDS


def stale_notes(obj: Obj, now: datetime.datetime, stale_after: float | None = None
                ) -> list[str]:
    """Why a LayerCache's status cannot be taken at face value; empty when it can.

    ``stale_after`` (seconds) overrides the cache's own ``refreshInterval`` plus
    `STALE_GRACE_SECONDS`. A paused cache is never re-resolved, so it is never stale by age.
    """
    status = obj.get("status") or {}
    meta = obj.get("metadata") or {}
    if not status:
        return ["no status yet: the operator has not reported on this LayerCache "
                "(is it running?)"]
    notes = []
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and observed != generation:
        notes.append(f"status is for generation {observed}, the spec is at generation "
                     f"{generation}: the operator has not caught up with the last change")
    written = status_written(obj)
    paused = bool((obj.get("spec") or {}).get("paused"))
    limit = stale_after if stale_after is not None else (
        _refresh_seconds(obj) + STALE_GRACE_SECONDS)
    if written is not None and not paused:
        behind = (now - written).total_seconds()
        if behind > limit:
            notes.append(f"status last written {age(behind)} ago (more than {age(limit)}): "
                         "the operator rewrites it at least every refreshInterval; "
                         "is it running?")
    return notes


def _conditions(status: Obj) -> dict[str, Obj]:
    return {c.get("type", ""): c for c in status.get("conditions") or ()}


def _reason(status: Obj) -> str:
    """The one reason a list row shows: Degraded's when degraded, else Ready's."""
    return headline_reason(status.get("conditions") or ())


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 else "-"


def _table(title: str | None, *columns: str) -> Table:
    # A trailing "#" marks a numeric column: right-aligned (as cli.print_tables does).
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column.rstrip("#"), justify="right" if column.endswith("#") else "left")
    return table


def render_list(console: Console, caches: Sequence[Obj], now: datetime.datetime,
                stale_after: float | None = None) -> None:
    """One row per LayerCache, then a line per cache whose status is missing or stale.

    Columns: NAMESPACE, NAME, READY (Ready condition), NODES (ready/desired), LAYERS
    (distinct, shared in brackets), UNIQUE and UPSTREAM (bytes), SAVED (saved bytes as a
    share of naive bytes; "-" until every node is ready), REASON (Degraded's reason when
    degraded, else Ready's), AGE.
    """
    table = _table(None, "NAMESPACE", "NAME", "READY", "NODES#", "LAYERS#", "UNIQUE#",
                   "UPSTREAM#", "SAVED#", "REASON", "AGE#")
    notes: list[str] = []
    for obj in caches:
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        read = LayerCacheStatus.of(obj)
        nodes, layers, bytes_ = read.nodes, read.layers, read.bytes
        created = _parse_time(meta.get("creationTimestamp"))
        ready_condition = read.condition("Ready")
        ready = ready_condition.status if ready_condition else "-"
        table.add_row(
            meta.get("namespace", ""), meta.get("name", ""), ready,
            f"{nodes.ready}/{nodes.desired}" if status else "-",
            f"{layers.total} ({layers.shared})" if status else "-",
            human_bytes(bytes_.unique) if status else "-",
            human_bytes(bytes_.upstream) if status else "-",
            # The operator counts savings only once every node is ready (status.py).
            _percent(bytes_.saved, bytes_.naive)
            if nodes.desired and nodes.ready == nodes.desired else "-",
            _reason(status) if status else "NoStatus",
            age((now - created).total_seconds()) if created else "-",
        )
        notes += [f"{cache_key(obj)}: {note}" for note in stale_notes(obj, now, stale_after)]
    console.print(table)
    for note in notes:
        console.print(Text(f"! {note}"), soft_wrap=True)


@dataclass(frozen=True)
class NodeRow:
    """One node of a LayerCache as the detail view shows it.

    ``held``/``wanted`` are layers and ``bytes_held``, ``upstream``, ``peer`` bytes, all
    from the node's agent (None when it has not reported); ``state`` is the cache's verdict
    on the node (its ``status.nodes.failing`` reason) or else the agent's Ready reason;
    ``caches`` how many LayerCaches want layers on the node; ``synced`` the agent's
    ``lastSync``; ``chains_wanted``/``chains_unpacked`` chains to unpack and those
    committed, ``bytes_unpacked`` the bytes extracted (None when not reported).
    """

    name: str
    held: int | None
    wanted: int | None
    bytes_held: int | None
    upstream: int | None
    peer: int | None
    state: str
    message: str
    caches: int
    synced: datetime.datetime | None
    chains_wanted: int | None = None
    chains_unpacked: int | None = None
    bytes_unpacked: int | None = None


def node_rows(cache: Obj, node_caches: Iterable[Obj]) -> list[NodeRow]:
    """The nodes of LayerCache ``cache``, sorted by name.

    Those whose NodeLayerCache spec lists the cache, and those its status lists as failing
    (a node without a NodeLayerCache shows up only there).
    """
    key = cache_key(cache)
    failing = {f.get("name", ""): f for f in
               ((cache.get("status") or {}).get("nodes") or {}).get("failing") or ()}
    rows: dict[str, NodeRow] = {}
    for obj in node_caches:
        # The agents' part of the contract, read through its models (lenient: a node whose
        # status does not read shows as reporting nothing, with a warning logged).
        spec = NodeLayerCacheSpec.read_lenient(obj.get("spec"))
        status = NodeLayerCacheStatus.of(obj)
        name = str((obj.get("metadata") or {}).get("name", ""))
        if key not in spec.caches and name not in failing:
            continue
        layers = status.layers if _reported(status, "layers") else None
        chains = status.chains if _reported(status, "chains") else None
        counted = status.bytes.model_fields_set if _reported(status, "bytes") else set()
        ready = status.condition("Ready")
        verdict = failing.get(name)
        rows[name] = NodeRow(
            name=name,
            held=layers.held if layers else None,
            wanted=layers.wanted if layers else None,
            bytes_held=layers.bytes_held if layers else None,
            upstream=status.bytes.upstream if "upstream" in counted else None,
            peer=status.bytes.peer if "peer" in counted else None,
            # A failing entry without a reason still reads as failing, never "None".
            state=str(verdict.get("reason") or "Failing" if verdict
                      else ready.reason if ready and "reason" in ready.model_fields_set
                      else "NoStatus"),
            message=str(verdict.get("message", "") if verdict else ""),
            caches=len(spec.caches),
            synced=_parse_time(status.last_sync),
            chains_wanted=chains.wanted if chains else None,
            chains_unpacked=chains.unpacked if chains else None,
            bytes_unpacked=chains.bytes_unpacked if chains else None,
        )
    for name, verdict in failing.items():
        rows.setdefault(name, NodeRow(name, None, None, None, None, None,
                                      str(verdict.get("reason") or "Failing"),
                                      str(verdict.get("message", "")), 0, None))
    return [rows[name] for name in sorted(rows)]


def _reported(status: NodeLayerCacheStatus, part: str) -> bool:
    """Whether the agent wrote ``status.<part>`` with at least one field in it."""
    value = getattr(status, part)
    return part in status.model_fields_set and bool(value.model_fields_set)


def _bar(row: NodeRow) -> RenderableType:
    if row.held is None or row.wanted is None:
        return Text("no report", style="dim")
    if row.wanted == 0:
        return Text("nothing wanted", style="dim")
    return ProgressBar(total=row.wanted, completed=min(row.held, row.wanted), width=BAR_WIDTH)


def _opt_bytes(value: int | None) -> str:
    return human_bytes(value) if value is not None else "-"


def render_detail(console: Console, cache: Obj, node_caches: Sequence[Obj] | None,
                  now: datetime.datetime, stale_after: float | None = None,
                  nodes_error: str | None = None) -> None:
    """One LayerCache in full: header, images, conditions, nodes with bars, savings, disk.

    ``node_caches`` are the cluster's NodeLayerCaches (None when they could not be read;
    ``nodes_error`` says why, e.g. RBAC). Byte figures are compressed blob bytes.
    """
    meta, status = cache.get("metadata") or {}, cache.get("status") or {}
    created = _parse_time(meta.get("creationTimestamp"))
    written = status_written(cache)
    header = Text.assemble(
        ("LayerCache ", "bold"), (cache_key(cache), "bold cyan"),
        f"  generation {meta.get('generation', '-')}",
        f", status for generation {status.get('observedGeneration', '-')}" if status else "",
        f", status written {age((now - written).total_seconds())} ago" if written else "",
        f", age {age((now - created).total_seconds())}" if created else "",
    )
    console.print(header, soft_wrap=True)
    for note in stale_notes(cache, now, stale_after):
        console.print(Text(f"! {note}", style="yellow"), soft_wrap=True)
    if not status:
        return
    read = LayerCacheStatus.of(cache)
    _print_images(console, read)
    _print_conditions(console, status, now)
    _print_nodes(console, cache, node_caches, now, nodes_error)
    _print_chains(console, read, node_rows(cache, node_caches or ()))
    _print_savings(console, read)
    _print_disk(console, cache, node_caches or ())


def _print_images(console: Console, status: LayerCacheStatus) -> None:
    images = _table("Images", "IMAGE", "PLATFORM", "DIGEST", "LAYERS#")
    for image in status.images:
        error = image.error
        digest = image.digest or ""
        images.add_row(escape(image.reference), image.platform or "-",
                       Text(f"error: {error}", style="red") if error else
                       digest[:19] + ("…" if len(digest) > 19 else ""),
                       str(image.layers if image.layers is not None else "-")
                       if not error else "-")
    console.print(images)


def _print_conditions(console: Console, status: Obj, now: datetime.datetime) -> None:
    table = _table("Conditions", "TYPE", "STATUS", "REASON", "MESSAGE", "SINCE#")
    for c in status.get("conditions") or ():
        since = _parse_time(c.get("lastTransitionTime"))
        table.add_row(c.get("type", ""), Text(str(c.get("status", "")), style=_tone(c)),
                      c.get("reason", ""), escape(str(c.get("message", ""))),
                      age((now - since).total_seconds()) if since else "-")
    console.print(table)


def _tone(c: Obj) -> str:
    """Colour of a condition's status: Ready good when True, Degraded bad when True."""
    true = c.get("status") == "True"
    if c.get("type") == "Ready":
        return "green" if true else "yellow"
    if c.get("type") == "Degraded":
        return "red" if true else "green"
    return ""


def _print_nodes(console: Console, cache: Obj, node_caches: Sequence[Obj] | None,
                 now: datetime.datetime, nodes_error: str | None) -> None:
    nodes = LayerCacheStatus.of(cache).nodes
    title = f"Nodes: {nodes.ready}/{nodes.desired} ready"
    rows = node_rows(cache, node_caches or ())
    table = _table(title, "NODE", "PROGRESS", "LAYERS#", "%#", "HELD#", "UPSTREAM#", "PEER#",
                   "STATE", "SYNCED#")
    for row in rows:
        layers = f"{row.held}/{row.wanted}" if row.held is not None else "-"
        share = _percent(row.held or 0, row.wanted or 0) if row.held is not None else "-"
        state = row.state + (f": {row.message}" if row.message else "")
        table.add_row(row.name, _bar(row), layers, share, _opt_bytes(row.bytes_held),
                      _opt_bytes(row.upstream), _opt_bytes(row.peer), escape(state),
                      age((now - row.synced).total_seconds()) if row.synced else "-")
    console.print(table)
    if node_caches is None:
        console.print(Text(f"! per-node progress unavailable: {nodes_error or 'not read'}",
                           style="yellow"), soft_wrap=True)
    shared = [row.name for row in rows if row.caches > 1]
    notes = ["LAYERS, HELD, UPSTREAM and PEER are the node agent's counters for everything "
             "it holds"]
    if shared:
        notes.append(f"{', '.join(shared)} also serve{'s' if len(shared) == 1 else ''} "
                     "other LayerCaches")
    console.print(Text("; ".join(notes) + ".", style="dim"), soft_wrap=True)


def _print_chains(console: Console, status: LayerCacheStatus, rows: Sequence[NodeRow]) -> None:
    """Chains unpacked ahead of pulls, per node; nothing when none are planned or wanted."""
    planned = status.chains
    if not planned.planned and not any(row.chains_wanted for row in rows):
        return
    table = _table(f"Unpacked chains: {planned.unpacked}/{planned.wanted}",
                   "NODE", "CHAINS#", "%#", "EXTRACTED#")
    for row in rows:
        if row.chains_wanted is None:
            table.add_row(row.name, "-", "-", "-")
            continue
        table.add_row(row.name, f"{row.chains_unpacked}/{row.chains_wanted}",
                      _percent(row.chains_unpacked or 0, row.chains_wanted),
                      _opt_bytes(row.bytes_unpacked))
    console.print(table)
    if planned.skipped_for_budget:
        console.print(Text(f"! {planned.skipped_for_budget} chain(s) not unpacked: their "
                           "estimated size is over maxBytesPerNode", style="yellow"),
                      soft_wrap=True)


def _print_savings(console: Console, status: LayerCacheStatus) -> None:
    b = status.bytes
    unique, naive, upstream, peer = b.unique, b.naive, b.upstream, b.peer
    fetched = upstream + peer
    layers = status.layers
    table = _table("Savings (this LayerCache)", "MEASURE", "BYTES#", "NOTE")
    table.add_row("unique layer bytes", human_bytes(unique),
                  f"{layers.total} distinct layers, {layers.shared} shared "
                  "by several images")
    table.add_row("naive upstream", human_bytes(naive),
                  "each node pulls the layers it holds itself")
    table.add_row("expected upstream", human_bytes(b.expected_upstream),
                  "what the latest plan still expects from upstream (0 once all is held)")
    table.add_row("from upstream, measured", human_bytes(upstream),
                  f"{_percent(upstream, fetched)} of fetched bytes; "
                  + (f"{upstream / unique:.3f} x unique" if unique else "no layers planned"))
    table.add_row("from peers, measured", human_bytes(peer),
                  f"{_percent(peer, fetched)} of fetched bytes, agent to agent")
    table.add_row("saved upstream", human_bytes(b.saved),
                  f"{_percent(b.saved, naive)} of naive"
                  + ("" if status.nodes.ready == status.nodes.desired else
                     " (counted once every node is ready)"))
    if layers.skipped_for_budget:
        table.add_row("skipped for budget", "-",
                      f"{layers.skipped_for_budget} layer(s) over maxBytesPerNode")
    console.print(table)


def _print_disk(console: Console, cache: Obj, node_caches: Iterable[Obj]) -> None:
    """Disk savings of the cache per node and in total (``status.disk``), when reported.

    Per node: the cache's entry in the NodeLayerCache's ``status.disk.caches``.
    """
    total = (cache.get("status") or {}).get("disk")
    if not total:
        return
    key = cache_key(cache)
    table = _table("Disk (this LayerCache)", "NODE", "BLOBS#", "SNAPSHOTS#", "SEPARATE#",
                   "SAVED#", "%#")

    def row(name: str, figures: Obj) -> None:
        separate, saved = int(figures.get("separate", 0)), int(figures.get("saved", 0))
        table.add_row(name, *(human_bytes(int(figures.get(k, 0)))
                              for k in ("blobs", "snapshots", "separate", "saved")),
                      _percent(saved, separate))
    for obj in sorted(node_caches, key=lambda o: str((o.get("metadata") or {}).get("name"))):
        disk = NodeLayerCacheStatus.of(obj).disk
        for entry in disk.caches if disk is not None else ():
            if entry.cache == key:
                row(str((obj.get("metadata") or {}).get("name", "")), entry.to_dict())
    row("total", total)
    console.print(table)
    console.print(Text("On disk: blobs (compressed, as stored) and unpacked chain snapshots "
                       "(Snapshots.Usage). SEPARATE: the same images each storing their own "
                       "layers and chains. SAVED: what sharing them saves; containerd's "
                       "content addressing shares them, layercache plans what is held and "
                       "measures it.", style="dim"), soft_wrap=True)


def cache_json(cache: Obj, node_caches: Sequence[Obj] | None) -> dict[str, Any]:
    """``-o json|yaml`` for one LayerCache: its identity, raw status, its nodes' raw status.

    Shape: ``{"metadata": {namespace, name, generation, creationTimestamp}, "status": {…},
    "nodes": {node: {"caches": [...], "status": {…}}}}``; ``nodes`` is null when the
    NodeLayerCaches could not be read.
    """
    key = cache_key(cache)
    nodes = None if node_caches is None else {
        str(o["metadata"]["name"]): {"caches": list((o.get("spec") or {}).get("caches") or ()),
                                     "status": o.get("status") or {}}
        for o in node_caches if key in ((o.get("spec") or {}).get("caches") or ())}
    return {"metadata": _identity(cache), "status": cache.get("status") or {}, "nodes": nodes}


def list_json(caches: Sequence[Obj]) -> dict[str, Any]:
    """``-o json|yaml`` without a name: ``{"items": [{"metadata": …, "status": …}]}``."""
    return {"items": [{"metadata": _identity(c), "status": c.get("status") or {}}
                      for c in caches]}


def _identity(obj: Obj) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    return {k: meta[k] for k in ("namespace", "name", "generation", "creationTimestamp")
            if k in meta}

