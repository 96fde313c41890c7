"""The operator's loops through their histories, in milliseconds, against in-memory twins.

`Controller` (layercache.controller.controller) runs on `KubeTwin` and `RegistryTwin`
(tests/twins/operator_kube.py) with resolved images given as values, a `ManualClock` for
time and an `InlineExecutor` for its blocking calls: no apiserver, registry or sleeping.
The same loops run against the real apiserver and registries in tests/integration
(test_operator.py, test_operator_resolve.py, test_e2e.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from layercache.api import Reason
from layercache.api.nodelayercache import spec_fingerprint
from layercache.controller.controller import REFRESH_INTERVAL_SECONDS, Controller
from layercache.controller.nodeindex import NodeCacheIndex, SpecRecord
from layercache.controller.replanner import CREDENTIALS_KEY, SPEC_WRITE_CONCURRENCY
from layercache.controller.settings import OperatorSettings
from layercache.oci.digest import Digest
from layercache.oci.image import Layer
from layercache.oci.platform import Platform
from layercache.oci.reference import parse_reference
from layercache.oci.resolved import ResolvedImage
from layercache.registry.errors import RateLimitedError
from twins.operator_kube import InlineExecutor, KubeTwin, ManualClock, RegistryTwin, settle

AMD64 = Platform("linux", "amd64")
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
NS = "team-a"


def _layer(name: str, size: int = 1000) -> Layer:
    return Layer(Digest.from_bytes(name.encode()), size, GZIP,
                 Digest.from_bytes(f"diff {name}".encode()))


BASE, PY, APP, WEB, TOOL = (_layer(n) for n in ("base", "python", "app", "web", "tool"))


def _image(ref: str, *layers: Layer, tag_version: str = "") -> ResolvedImage:
    """``ref`` resolved for linux/amd64 to a manifest of ``layers``.

    Another ``tag_version`` is another manifest: the tag moved.
    """
    manifest = Digest.from_bytes(f"manifest {ref} {tag_version}".encode())
    return ResolvedImage(
        reference=parse_reference(ref), digest=manifest,
        media_type="application/vnd.oci.image.manifest.v1+json",
        platform=AMD64, manifest_platform=AMD64, manifest_digest=manifest,
        manifest_media_type="application/vnd.oci.image.manifest.v1+json", manifest_size=500,
        config_digest=Digest.from_bytes(f"config {ref}".encode()), config_size=100,
        config_media_type="application/vnd.oci.image.config.v1+json", layers=layers)


IMAGES = {"reg.example/app:1": _image("reg.example/app:1", BASE, PY, APP),
          "reg.example/web:1": _image("reg.example/web:1", BASE, PY, WEB),
          "reg.example/tool:1": _image("reg.example/tool:1", BASE, TOOL)}


@dataclass
class Bed:
    kube: KubeTwin
    registry: RegistryTwin
    clock: ManualClock
    metrics: CollectorRegistry
    controller: Controller

    async def create(self, name: str, spec: dict[str, Any]) -> None:
        """A LayerCache created: what the kopf create handler does, then one replan."""
        obj = self.kube.add_cache(NS, name, spec)
        await self.controller.resolve(NS, name, 1, spec, obj["metadata"]["uid"],
                                      obj["status"])

    def restart(self) -> Controller:
        """A new operator process on the same cluster (state only in the apiserver)."""
        self.metrics = CollectorRegistry()
        self.controller = Controller(self.kube, OperatorSettings(), self.metrics,
                                     images=self.registry, clock=self.clock.now,
                                     sleep=self.clock.sleep)
        self.controller.index.spawn = _inline
        return self.controller

    async def warm(self, name: str, spec: dict[str, Any]) -> None:
        """Cache ``name`` created with the loops running, planned, and Ready on n1 and n2."""
        self.controller.start()
        await self.create(name, spec)
        self.controller.trigger()  # as the create handler does
        await self.clock.advance(OperatorSettings().replan_debounce_seconds)
        self.agent_ready("n1")
        self.agent_ready("n2")
        await self.clock.advance(0)  # the watch brings the reports

    def node_layers(self, node: str) -> set[str]:
        return {entry["digest"] for entry in self.kube.node_caches[node]["spec"]["layers"]}

    def agent_ready(self, node: str, upstream: int = 0, peer: int = 0) -> None:
        """The agent on ``node`` reports its spec's generation held, with byte counters."""
        obj = self.kube.node_caches[node]
        self.kube.report(node, {
            "observedGeneration": obj["metadata"]["generation"], "synced": True,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Ready",
                            "message": "", "lastTransitionTime": "2026-12-07T05:00:00Z"}],
            "bytes": {"upstream": upstream, "peer": peer}})


def _inline(run: Callable[[], None]) -> None:
    """Run the index's watch at once in this thread (the twin's watch never blocks)."""
    run()


@pytest.fixture
async def bed() -> AsyncIterator[Bed]:
    asyncio.get_running_loop().set_default_executor(InlineExecutor())
    kube, clock = KubeTwin(), ManualClock()
    for name in ("n1", "n2"):
        kube.add_node(name, {"pool": "a"})
    kube.add_node("n3", {"pool": "b"})
    registry = RegistryTwin({(ref, str(AMD64)): image for ref, image in IMAGES.items()})
    metrics = CollectorRegistry()
    controller = Controller(kube, OperatorSettings(), metrics, images=registry,
                            clock=clock.now, sleep=clock.sleep)
    controller.index.spawn = _inline
    yield Bed(kube, registry, clock, metrics, controller)
    controller.stop()


def _spec(*images: str, pool: str = "a", **more: Any) -> dict[str, Any]:
    return {"images": list(images), "platforms": ["linux/amd64"], "nodeSelector": {"pool": pool},
            **more}


async def test_created_cache_writes_one_spec_per_node(bed: Bed) -> None:
    await bed.create("c", _spec("reg.example/app:1", "reg.example/web:1"))
    state = bed.controller.caches[f"{NS}/c"]
    assert [str(r.reference) for r in state.resolved] == ["reg.example/app:1",
                                                          "reg.example/web:1"]
    assert await bed.controller.replan() == {"n1": True, "n2": True}
    assert bed.kube.writes["node_spec"] == 2
    assert set(bed.kube.node_caches) == {"n1", "n2"}  # n3 is not selected: no object
    wanted = {str(layer.digest) for layer in (BASE, PY, APP, WEB)}
    assert bed.node_layers("n1") == bed.node_layers("n2") == wanted
    assert state.planned and state.desired_nodes == ("n1", "n2")
    assert bed.metrics.get_sample_value("layercache_operator_node_spec_writes_total") == 2


async def test_unchanged_inputs_write_nothing(bed: Bed) -> None:
    spec = _spec("reg.example/app:1", "reg.example/web:1")
    await bed.create("c", spec)
    await bed.controller.replan()
    versions = {n: o["metadata"]["resourceVersion"] for n, o in bed.kube.node_caches.items()}
    writes = dict(bed.kube.writes)
    # The same spec again (a kopf resume) and a replan: nothing written, no version moves.
    await bed.controller.resolve(NS, "c", 1, spec)
    assert await bed.controller.replan() == {"n1": False, "n2": False}
    assert dict(bed.kube.writes) == writes
    assert {n: o["metadata"]["resourceVersion"]
            for n, o in bed.kube.node_caches.items()} == versions


async def test_added_image_writes_each_affected_node_once(bed: Bed) -> None:
    await bed.create("a", _spec("reg.example/app:1"))
    await bed.create("b", _spec("reg.example/web:1", pool="b"))
    await bed.controller.replan()
    assert bed.kube.writes["node_spec"] == 3
    generations = {n: o["metadata"]["generation"] for n, o in bed.kube.node_caches.items()}
    await bed.controller.resolve(NS, "a", 2, _spec("reg.example/app:1", "reg.example/tool:1"))
    assert await bed.controller.replan() == {"n1": True, "n2": True, "n3": False}
    assert bed.kube.writes["node_spec"] == 5
    assert str(TOOL.digest) in bed.node_layers("n1")
    assert str(TOOL.digest) not in bed.node_layers("n3")
    assert {n: o["metadata"]["generation"] for n, o in bed.kube.node_caches.items()} == {
        "n1": generations["n1"] + 1, "n2": generations["n2"] + 1, "n3": generations["n3"]}


async def test_node_added_then_removed(bed: Bed) -> None:
    await bed.create("c", _spec("reg.example/app:1"))
    await bed.controller.replan()
    bed.kube.add_node("n4", {"pool": "a"})
    assert await bed.controller.replan() == {"n1": False, "n2": False, "n4": True}
    assert bed.controller.caches[f"{NS}/c"].desired_nodes == ("n1", "n2", "n4")
    bed.kube.remove_node("n1")
    # The others are rewritten: n1 is no longer anyone's peer; its object is deleted.
    assert await bed.controller.replan() == {"n2": True, "n4": True}
    assert all('"n1"' not in json.dumps(o["spec"]) for o in bed.kube.node_caches.values())
    assert "n1" not in bed.kube.node_caches
    assert bed.kube.writes["node_delete"] == 1
    assert bed.controller.caches[f"{NS}/c"].desired_nodes == ("n2", "n4")


async def test_failed_image_reports_reason_and_others_plan(bed: Bed) -> None:
    await bed.create("c", _spec("reg.example/app:1", "reg.example/gone:1"))
    state = bed.controller.caches[f"{NS}/c"]
    assert [(e.reference, e.reason) for e in state.errors] == [
        ("reg.example/gone:1", Reason.MANIFEST_NOT_FOUND)]
    await bed.controller.replan()
    assert bed.node_layers("n1") == {str(layer.digest) for layer in (BASE, PY, APP)}
    assert await bed.controller.aggregate() == 1
    status = bed.kube.caches[f"{NS}/c"]["status"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Degraded"]["status"] == "True"
    assert conditions["Degraded"]["reason"] == "ManifestNotFound"
    assert conditions["Ready"]["reason"] == "ImagesUnresolved"
    assert [i.get("error", "")[:16] for i in status["images"]] == ["", "ManifestNotFound"]
    assert bed.metrics.get_sample_value("layercache_operator_resolve_errors_total",
                                        {"reason": "ManifestNotFound"}) == 1


async def test_aggregation_of_node_statuses_and_metrics(bed: Bed) -> None:
    await bed.create("c", _spec("reg.example/app:1", "reg.example/web:1"))
    await bed.controller.replan()
    await bed.controller.aggregate()
    status = bed.kube.caches[f"{NS}/c"]["status"]
    assert status["nodes"]["summary"] == "0/2"
    bed.agent_ready("n1", upstream=4000)
    bed.agent_ready("n2", peer=4000)
    assert await bed.controller.aggregate() == 1
    status = bed.kube.caches[f"{NS}/c"]["status"]
    assert status["nodes"]["summary"] == "2/2"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True", "Progressing": "False", "Degraded": "False"}
    assert (status["bytes"]["upstream"], status["bytes"]["peer"]) == (4000, 4000)
    assert await bed.controller.aggregate() == 0  # unchanged: not written again
    sample = bed.metrics.get_sample_value
    assert sample("layercache_cache_ready", {"cache": f"{NS}/c"}) == 1
    assert sample("layercache_cache_nodes", {"cache": f"{NS}/c", "state": "ready"}) == 2


async def test_byte_counters_survive_an_operator_restart(bed: Bed) -> None:
    await bed.create("c", _spec("reg.example/app:1"))
    await bed.controller.replan()
    bed.agent_ready("n1", upstream=3000)
    bed.agent_ready("n2", peer=3000)
    await bed.controller.aggregate()
    assert bed.kube.caches[f"{NS}/c"]["status"]["bytes"]["upstream"] == 3000
    controller = bed.restart()
    stored = bed.kube.caches[f"{NS}/c"]
    await controller.resolve(NS, "c", 1, stored["spec"], "", stored["status"])
    # Resumed, not planned yet: the stored status stands (no flapping to 0).
    assert await controller.aggregate() == 0
    await controller.replan()  # baselines: the counters as they stand now
    bed.agent_ready("n1", upstream=3500)
    await controller.aggregate()
    counted = bed.kube.caches[f"{NS}/c"]["status"]["bytes"]
    assert (counted["upstream"], counted["peer"]) == (3500, 3000)


async def test_tag_refresh_due_and_not_due(bed: Bed) -> None:
    await bed.create("c", _spec("reg.example/app:1", refreshInterval="10m"))
    key = f"{NS}/c"
    await bed.clock.advance(599)
    assert not bed.controller.due_for_refresh(key)
    assert await bed.controller.refresh() == 0
    assert bed.registry.lookups_made[("reg.example/app:1", "linux/amd64")] == 1
    await bed.clock.advance(1)
    assert bed.controller.due_for_refresh(key)
    moved = _image("reg.example/app:1", BASE, PY, TOOL, tag_version="2")
    bed.registry.images[("reg.example/app:1", "linux/amd64")] = moved
    assert await bed.controller.refresh() == 1
    assert bed.controller.caches[key].resolved == [moved]
    assert [(e[2], e[3][:12]) for e in bed.kube.events] == [("TagMoved", "re-resolved:")]
    assert not bed.controller.due_for_refresh(key)


async def test_transient_failure_retried_after_retry_after(bed: Bed) -> None:
    bed.registry.images[("reg.example/app:1", "linux/amd64")] = RateLimitedError(
        "GET reg.example/v2/app/manifests/1", retry_after=45.0)
    await bed.create("c", _spec("reg.example/app:1"))
    key = f"{NS}/c"
    assert bed.controller.caches[key].errors[0].reason == Reason.RATE_LIMITED
    await bed.clock.advance(44)  # not the 30 s of a transient failure: the server said 45
    assert not bed.controller.due_for_refresh(key)
    await bed.clock.advance(1)
    assert bed.controller.due_for_refresh(key)


async def test_deleted_cache_is_forgotten_and_released(bed: Bed) -> None:
    bed.kube.dockerconfig_secret(NS, "pull", {"reg.example": {"auth": "dXNlcjpwYXNz"}})
    await bed.create("c", _spec("reg.example/app:1", pullSecrets=[{"name": "pull"}]))
    await bed.controller.replan()
    credentials = bed.kube.secrets[("layercache-system", "layercache-registry-credentials")]
    assert f"{NS}/c" in credentials["data"][CREDENTIALS_KEY]
    uid = bed.controller.caches[f"{NS}/c"].uid
    bed.kube.delete_cache(NS, "c")
    bed.controller.forget(NS, "c", uid)
    assert f"{NS}/c" not in bed.controller.caches
    assert await bed.controller.replan() == {"n1": True, "n2": True}
    assert bed.node_layers("n1") == bed.node_layers("n2") == set()
    assert credentials != bed.kube.secrets[("layercache-system",
                                            "layercache-registry-credentials")]


async def test_loops_replan_once_per_burst_and_stop_when_leadership_is_lost(
        bed: Bed) -> None:
    lost = asyncio.Event()
    tasks = bed.controller.start(lost=lost)
    await bed.create("c", _spec("reg.example/app:1"))
    for _ in range(5):  # a burst of events in one debounce window
        bed.controller.trigger()
    await bed.clock.advance(OperatorSettings().replan_debounce_seconds)
    assert bed.metrics.get_sample_value("layercache_operator_replans_total",
                                        {"result": "ok"}) == 1
    assert bed.kube.writes["node_spec"] == 2
    await bed.clock.advance(OperatorSettings().status_interval_seconds)  # the status loop
    assert bed.kube.writes["cache_status"] == 1
    lost.set()
    await settle()
    assert all(task.done() for task in tasks)
    bed.kube.add_node("n4", {"pool": "a"})
    bed.controller.trigger()
    await bed.clock.advance(REFRESH_INTERVAL_SECONDS)
    assert bed.kube.writes["node_spec"] == 2  # a stopped controller writes nothing


async def test_failed_replan_is_retried_after_backoff(bed: Bed) -> None:
    bed.controller.start()
    await bed.create("c", _spec("reg.example/app:1"))
    nodes, calls = bed.kube.nodes, []

    def flaky() -> list[Any]:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("apiserver unreachable")
        return nodes()

    bed.kube.nodes = flaky  # type: ignore[method-assign]
    bed.controller.trigger()
    await bed.clock.advance(OperatorSettings().replan_debounce_seconds)
    assert bed.metrics.get_sample_value("layercache_operator_replans_total",
                                        {"result": "error"}) == 1
    assert bed.kube.writes["node_spec"] == 0
    await bed.clock.advance(2.0)  # REPLAN_BACKOFF's first delay
    await bed.clock.advance(OperatorSettings().replan_debounce_seconds)
    assert bed.kube.writes["node_spec"] == 2


async def test_node_and_inventory_events_trigger_only_on_change(bed: Bed) -> None:
    node = {"metadata": {"name": "n1", "labels": {"pool": "a"}}, "spec": {}}
    assert bed.controller.node_event("ADDED", node)
    assert not bed.controller.node_event("MODIFIED", {**node, "status": {"heartbeat": 1}})
    assert bed.controller.node_event("MODIFIED", {**node, "spec": {"unschedulable": True}})
    assert bed.controller.node_event("DELETED", node)
    inventory: dict[str, Any] = {"metadata": {"name": "n1"},
                                 "status": {"missing": ["sha256:" + "a" * 64]}}
    assert bed.controller.inventory_event("MODIFIED", inventory)
    assert not bed.controller.inventory_event(
        "MODIFIED", {**inventory, "status": {**inventory["status"], "lastSync": "now"}})


def test_cache_state_changes_only_through_its_methods() -> None:
    """Only state.py assigns `CacheState` fields (``state.invalid = ...``).

    The other modules of the controller call the state's methods instead.
    """
    import ast
    from dataclasses import fields
    from pathlib import Path

    import layercache.controller
    from layercache.controller.state import CacheState

    names = {f.name for f in fields(CacheState)}
    package = Path(layercache.controller.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "state.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (node.targets if isinstance(node, ast.Assign) else
                       [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else [])
            for target in targets:
                for item in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if (isinstance(item, ast.Attribute) and item.attr in names
                            and not (isinstance(item.value, ast.Name)
                                     and item.value.id == "self")):
                        found.append(f"{path.name}:{node.lineno} .{item.attr}")
    assert found == []


def test_operator_class_names_are_its_own() -> None:
    """The operator's class names are its own; `ResolvedImage` exists once, in oci.

    No class of the controller shares its name with another class of the package (as the
    operator's `Reconciler` and `NodeInfo` did with the agent's).
    """
    import re
    from pathlib import Path

    import layercache

    package = Path(layercache.__file__).parent
    defined: dict[str, list[str]] = {}
    for path in package.rglob("*.py"):
        if "protos" in path.parts:
            continue
        for name in re.findall(r"^class (\w+)", path.read_text(), re.MULTILINE):
            defined.setdefault(name, []).append(str(path.relative_to(package)))
    ours = {name for name, paths in defined.items()
            if any(p.startswith("controller/") for p in paths)}
    assert {name: defined[name] for name in ours if len(defined[name]) > 1} == {}
    assert defined["ResolvedImage"] == ["oci/resolved.py"]
    assert defined["PlanImage"] == ["oci/image.py"]


# -- the NodeLayerCache index (layercache.controller.nodeindex) -------------------------------
async def test_index_lists_once_then_follows_the_watch(bed: Bed) -> None:
    """Replans, aggregation and the warm round read the index: one list, then the watch."""
    bed.controller.start()
    await bed.create("c", _spec("reg.example/app:1"))
    bed.controller.trigger()  # as the create handler does
    await bed.clock.advance(OperatorSettings().replan_debounce_seconds)
    assert bed.kube.writes["node_spec"] == 2
    lists = bed.kube.reads["node_caches"]
    bed.agent_ready("n1")
    bed.agent_ready("n2")
    for _ in range(5):  # five status and warm rounds, each with a replan
        bed.controller.trigger()
        await bed.clock.advance(OperatorSettings().status_interval_seconds)
    status = bed.kube.caches[f"{NS}/c"]["status"]
    assert status["nodes"]["summary"] == "2/2"  # the agents' reports came by the watch
    assert bed.kube.reads["node_caches"] == lists == 1  # the first list, none since
    assert bed.controller.index.lists == 1
    assert bed.kube.reads["watch"] > 1
    indexed = (await bed.controller.index.current())["n1"]
    # Not the whole object: the kept fields, a record of the spec (not the spec), and what
    # the node holds (a set of digests).
    assert set(indexed) == {"metadata", "record", "status", "held"}
    stored = bed.kube.node_caches["n1"]["spec"]
    assert indexed["record"] == SpecRecord.of("n1", stored)
    assert indexed["record"].layers == tuple(e["digest"] for e in stored["layers"])
    assert indexed["record"].fingerprint == spec_fingerprint(stored)
    assert indexed["held"] == frozenset()  # no inventory reported (no `missing`, none held)
    assert indexed["status"]["synced"] is True


async def test_index_records_each_spec_once_and_a_spec_edited_by_hand_is_rewritten(
        bed: Bed) -> None:
    """The index keeps a record per spec generation, not the spec; status churn reuses it.

    A spec changed by someone else (a new generation) gets a new record, differs from the
    desired spec's fingerprint, and the next replan writes it back, once.
    """
    bed.controller.start()
    await bed.create("c", _spec("reg.example/app:1"))
    bed.controller.trigger()  # as the create handler does
    await bed.clock.advance(OperatorSettings().replan_debounce_seconds)
    written = bed.kube.writes["node_spec"]
    record = (await bed.controller.index.current())["n1"]["record"]
    bed.agent_ready("n1")  # a status event: same generation
    await bed.clock.advance(0)
    assert (await bed.controller.index.current())["n1"]["record"] is record
    desired = json.loads(json.dumps(bed.kube.node_caches["n1"]["spec"]))
    edited = bed.kube.node_caches["n1"]
    edited["spec"] = {**desired, "layers": desired["layers"][:1]}
    edited["metadata"]["generation"] += 1
    bed.kube.put_node_cache(edited)
    await bed.clock.advance(0)
    now = (await bed.controller.index.current())["n1"]["record"]
    assert now.layers == (desired["layers"][0]["digest"],) and now != record
    assert await bed.controller.replan() == {"n1": True, "n2": False}
    assert bed.kube.node_caches["n1"]["spec"] == desired
    assert bed.kube.writes["node_spec"] == written + 1
    await bed.clock.advance(0)
    assert await bed.controller.replan() == {"n1": False, "n2": False}


def test_a_record_is_reused_only_for_the_same_object_and_generation() -> None:
    """A record is kept across status changes, never across objects.

    Deleted and created again while the watch was away (generation 1 again): a re-list
    must read the new object's spec, not keep the old one's record.
    """
    def listed(uid: str, digest: str, status: dict[str, Any]) -> dict[str, Any]:
        return {"metadata": {"name": "n1", "generation": 1, "uid": uid},
                "spec": {"layers": [{"digest": digest, "size": 1, "repository": "r",
                                     "source": "Peer", "peers": ["n2"]}]}, "status": status}
    index = NodeCacheIndex(kube=None)  # type: ignore[arg-type]  # fed by hand
    index.replace([listed("u1", "sha256:" + "a" * 64, {})], "1")
    first = index._objects["n1"]["record"]
    index.replace([listed("u1", "sha256:" + "a" * 64, {"observedGeneration": 1})], "2")
    assert index._objects["n1"]["record"] is first  # a status change: the same record
    index.replace([listed("u2", "sha256:" + "b" * 64, {})], "9")
    assert index._objects["n1"]["record"].layers == ("sha256:" + "b" * 64,)
    index.apply("MODIFIED", {"metadata": {"name": "n1", "generation": 2}, "spec": {
        "layers": 5}, "status": {}})  # not the CRD's: read as no layers, never raises
    assert index._objects["n1"]["record"].layers == ()


@pytest.mark.parametrize("peers", [None, {}, "", False, [1]])
def test_a_stored_spec_with_unreadable_peers_never_equals_the_desired_one(peers: Any) -> None:
    """Peers are compared apart from the fingerprint: an unreadable value must not pass."""
    desired = {"nodeName": "n1", "layers": [{"digest": "sha256:" + "a" * 64, "size": 1,
                                             "repository": "r", "source": "Upstream",
                                             "peers": []}]}
    stored = {**desired, "layers": [{**desired["layers"][0], "peers": peers}]}
    absent = {**desired, "layers": [{k: v for k, v in desired["layers"][0].items()
                                     if k != "peers"}]}
    assert SpecRecord.of("n1", stored) != SpecRecord.of("n1", desired)
    assert SpecRecord.of("n1", absent) == SpecRecord.of("n1", desired)  # the CRD's default


async def test_index_lists_again_after_410_gone(bed: Bed) -> None:
    bed.controller.start()
    await bed.create("c", _spec("reg.example/app:1"))
    bed.controller.trigger()  # as the create handler does
    await bed.clock.advance(OperatorSettings().replan_debounce_seconds)
    bed.agent_ready("n1")
    bed.kube.compact()  # the watch's resourceVersion is now too old
    await bed.clock.advance(0)
    await bed.clock.advance(0)
    assert bed.controller.index.lists == 2
    assert bed.kube.reads["node_caches"] == 2
    indexed = await bed.controller.index.current()
    assert indexed["n1"]["status"]["synced"] is True


async def test_index_follows_deletes_and_skips_malformed_objects(
        bed: Bed, caplog: pytest.LogCaptureFixture) -> None:
    tasks = bed.controller.start()
    await bed.create("c", _spec("reg.example/app:1"))
    bed.controller.trigger()  # as the create handler does
    await bed.clock.advance(OperatorSettings().replan_debounce_seconds)
    bed.kube.put_node_cache({"spec": {"layers": []}})  # no metadata.name
    bed.kube.put_node_cache({"metadata": {"name": "odd"}, "spec": "not an object"})
    bed.kube.put_node_cache({"metadata": {"name": "n9"}, "spec": {}, "status": {}})
    await bed.clock.advance(0)
    indexed = await bed.controller.index.current()
    assert set(indexed) == {"n1", "n2", "n9"}
    assert "NodeLayerCache ADDED event skipped: NodeLayerCache without metadata" in caplog.text
    assert "NodeLayerCache odd: spec and status must be objects" in caplog.text
    assert not any(task.done() for task in tasks)  # the watch goes on
    bed.kube.delete_node_cache("n2")  # gone (by hand): a DELETED event
    await bed.clock.advance(0)
    assert set(await bed.controller.index.current()) == {"n1", "n9"}


async def test_stale_event_after_a_write_does_not_cause_a_second_write(bed: Bed) -> None:
    bed.controller.start()
    await bed.create("c", _spec("reg.example/app:1"))
    bed.controller.trigger()  # as the create handler does
    await bed.clock.advance(OperatorSettings().replan_debounce_seconds)
    stale = json.loads(json.dumps(bed.kube.node_caches["n1"]))  # the spec before the change
    await bed.create("c", _spec("reg.example/app:1", "reg.example/web:1"))
    assert await bed.controller.replan() == {"n1": True, "n2": True}
    # An agent's status event made before that write arrives after it.
    bed.controller.index.apply("MODIFIED", stale)
    assert await bed.controller.replan() == {"n1": False, "n2": False}
    assert bed.kube.writes["node_spec"] == 4  # one per node per change


async def test_a_node_is_not_ready_for_a_spec_its_agent_has_not_observed(bed: Bed) -> None:
    """A spec just written stands in the index with its new generation, never the old one.

    Found in CI: the index kept the old generation beside the new spec, so the agent's
    Ready for the old spec counted for the new one — a cache Ready before any node fetched.
    """
    await bed.warm("c", _spec("reg.example/app:1"))
    await bed.controller.aggregate()
    assert bed.kube.caches[f"{NS}/c"]["status"]["nodes"]["summary"] == "2/2"
    stale = json.loads(json.dumps(bed.kube.node_caches["n1"]))  # Ready at generation 1
    await bed.create("c", _spec("reg.example/app:1", "reg.example/web:1"))
    assert await bed.controller.replan() == {"n1": True, "n2": True}
    indexed = await bed.controller.index.current()
    assert [indexed[n]["metadata"]["generation"] for n in ("n1", "n2")] == [2, 2]

    def summary() -> str:
        return str(bed.kube.caches[f"{NS}/c"]["status"]["nodes"]["summary"])
    await bed.controller.aggregate()  # before the watch brought the writes
    assert summary() == "0/2"
    bed.controller.index.apply("MODIFIED", stale)  # a report made before the write
    await bed.controller.aggregate()
    assert summary() == "0/2"
    await bed.clock.advance(0)  # the watch brings the writes
    await bed.controller.aggregate()
    assert summary() == "0/2"
    bed.agent_ready("n1")  # at generation 2
    await bed.clock.advance(0)
    await bed.controller.aggregate()
    assert summary() == "1/2"


async def test_status_never_reads_a_plan_beside_specs_not_written_yet(bed: Bed) -> None:
    """Aggregation between a replan's plan and its spec writes sees the old plan.

    Found in CI: status aggregation (its own loop) ran while a replan was writing the specs
    of a new cache; the cache already had its nodes, their objects still the old specs with
    their agents Ready for them — so the new cache read Ready before any node had fetched.
    """
    await bed.warm("old", _spec("reg.example/app:1"))
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(4))
    entered, release = threading.Event(), threading.Event()
    write = bed.kube.write_node_spec

    def held_write(exists: bool, name: str, spec: dict[str, Any]) -> int:
        entered.set()
        assert release.wait(10), "the test never released the write"
        return write(exists, name, spec)
    bed.kube.write_node_spec = held_write  # type: ignore[method-assign]
    await bed.create("new", _spec("reg.example/web:1"))
    replan = asyncio.create_task(bed.controller.replan())
    try:
        assert await asyncio.to_thread(entered.wait, 10), "the replan wrote no spec"
        await bed.controller.aggregate()  # the replan has planned; no spec is written yet
    finally:
        release.set()
    assert await replan == {"n1": True, "n2": True}
    status = bed.kube.caches[f"{NS}/new"]["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], status["nodes"]["summary"]) == ("False", "0/0")
    await bed.controller.aggregate()  # written: the agents have not observed them yet
    status = bed.kube.caches[f"{NS}/new"]["status"]
    assert status["nodes"]["summary"] == "0/2"
    bed.agent_ready("n1")
    bed.agent_ready("n2")
    await bed.clock.advance(0)
    await bed.controller.aggregate()
    assert bed.kube.caches[f"{NS}/new"]["status"]["nodes"]["summary"] == "2/2"


async def test_every_status_is_made_from_one_reading_of_the_index(bed: Bed) -> None:
    """A replan that ends while aggregation writes one status is not read beside old nodes.

    Aggregation makes every cache's status before its first write; made after it, the
    second cache's status paired a plan made after the index was read.
    """
    await bed.warm("old", _spec("reg.example/app:1"))
    await bed.controller.aggregate()
    await bed.create("new", _spec("reg.example/web:1"))
    bed.agent_ready("n1", upstream=1000)  # the old cache's status changes: a write
    await bed.clock.advance(0)
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(4))
    entered, release = threading.Event(), threading.Event()
    patch = bed.kube.patch_cache_status

    def held_patch(namespace: str, name: str, status: dict[str, Any]) -> None:
        if name == "old":
            entered.set()
            assert release.wait(10), "the test never released the write"
        patch(namespace, name, status)
    bed.kube.patch_cache_status = held_patch  # type: ignore[method-assign]
    aggregate = asyncio.create_task(bed.controller.aggregate())
    try:
        assert await asyncio.to_thread(entered.wait, 10), "no status write"
        assert await bed.controller.replan() == {"n1": True, "n2": True}
    finally:
        release.set()
    await aggregate
    status = bed.kube.caches[f"{NS}/new"]["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], status["nodes"]["summary"]) == ("False", "0/0")
    await bed.controller.aggregate()
    assert bed.kube.caches[f"{NS}/new"]["status"]["nodes"]["summary"] == "0/2"


async def test_a_node_holds_what_its_agent_reported_for_the_spec_it_observed(
        bed: Bed) -> None:
    """Between a spec write and the agent's next report, ``missing`` is about the old spec.

    Read against the new spec, a layer just added counted as held: the plan expected
    nothing from upstream for it. The index keeps what each node held when its status last
    described its spec, across a re-list too.
    """
    await bed.warm("old", _spec("reg.example/app:1"))
    for node in ("n1", "n2"):  # an inventory: nothing of generation 1 missing
        generation = bed.kube.node_caches[node]["metadata"]["generation"]
        bed.kube.report(node, {"observedGeneration": generation, "missing": [],
                               "layers": {"wanted": 3, "held": 3}})
    await bed.clock.advance(0)
    await bed.create("new", _spec("reg.example/web:1"))

    def expected_upstream() -> int:
        plan = bed.controller.caches[f"{NS}/new"].plan
        assert plan is not None
        return plan.savings.expected_upstream_bytes
    assert await bed.controller.replan() == {"n1": True, "n2": True}
    assert expected_upstream() == WEB.size  # base and python are held
    await bed.clock.advance(0)  # the watch brings the writes; the agents have not reported
    assert await bed.controller.replan() == {"n1": False, "n2": False}
    assert expected_upstream() == WEB.size
    items, version = bed.kube.list_node_caches()
    bed.controller.index.replace(items, version)  # a re-list (410 Gone)
    assert await bed.controller.replan() == {"n1": False, "n2": False}
    assert expected_upstream() == WEB.size
    for node in ("n1", "n2"):  # the agents report on the new spec: web fetched
        generation = bed.kube.node_caches[node]["metadata"]["generation"]
        bed.kube.report(node, {"observedGeneration": generation, "missing": [],
                               "layers": {"wanted": 4, "held": 4}})
    await bed.clock.advance(0)
    assert await bed.controller.replan() == {"n1": False, "n2": False}
    assert expected_upstream() == 0


async def test_spec_writes_run_bounded_in_parallel_and_skip_equal_specs() -> None:
    """Not one at a time, not all at once: `SPEC_WRITE_CONCURRENCY` in threads."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(64))
    kube = KubeTwin()
    for i in range(40):
        kube.add_node(f"n{i:02d}", {"pool": "a"})
    lock, in_flight, peak, calls = threading.Lock(), [0], [0], [0]
    write = kube.write_node_spec

    def slow_write(exists: bool, name: str, spec: dict[str, Any]) -> int:
        with lock:
            in_flight[0] += 1
            calls[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
            return write(exists, name, spec)

    kube.write_node_spec = slow_write  # type: ignore[method-assign]
    registry = RegistryTwin({(ref, str(AMD64)): image for ref, image in IMAGES.items()})
    controller = Controller(kube, OperatorSettings(), images=registry)
    obj = kube.add_cache(NS, "c", _spec("reg.example/app:1"))
    await controller.resolve(NS, "c", 1, obj["spec"], obj["metadata"]["uid"])
    written = await controller.replan()
    assert sum(written.values()) == 40 and calls[0] == 40
    assert peak[0] == SPEC_WRITE_CONCURRENCY
    assert await controller.replan() == dict.fromkeys(written, False)
    assert calls[0] == 40  # equal specs: not even a call


def _hold_lookups(bed: Bed, reference: str) -> asyncio.Event:
    """Lookups of ``reference`` wait until the returned event is set (others answer)."""
    gate, inner = asyncio.Event(), bed.registry.lookups

    @asynccontextmanager
    async def held() -> AsyncIterator[Any]:
        async with inner() as lookup:
            async def waiting(ref: Any, *args: Any) -> ResolvedImage:
                if str(ref) == reference:
                    await gate.wait()
                return await lookup(ref, *args)
            yield waiting

    bed.registry.lookups = held  # type: ignore[method-assign]
    return gate


async def test_a_cache_deleted_while_its_tags_refresh_stays_deleted(bed: Bed) -> None:
    await bed.create("c", _spec("reg.example/app:1", refreshInterval="10m"))
    await bed.controller.replan()
    assert bed.node_layers("n1") == bed.node_layers("n2") != set()
    await bed.clock.advance(600)
    gate = _hold_lookups(bed, "reg.example/app:1")
    refresh = asyncio.ensure_future(bed.controller.refresh())
    await settle()
    uid = bed.controller.caches[f"{NS}/c"].uid
    bed.kube.delete_cache(NS, "c")
    bed.controller.forget(NS, "c", uid)  # its DELETED event, while the registry is asked
    gate.set()
    assert await refresh == 0
    assert f"{NS}/c" not in bed.controller.caches
    assert await bed.controller.replan() == {"n1": True, "n2": True}
    assert bed.node_layers("n1") == bed.node_layers("n2") == set()


async def test_a_tag_refresh_never_overwrites_a_newer_spec(bed: Bed) -> None:
    await bed.create("c", _spec("reg.example/app:1", refreshInterval="10m"))
    key, uid = f"{NS}/c", bed.controller.caches[f"{NS}/c"].uid
    await bed.clock.advance(600)
    gate = _hold_lookups(bed, "reg.example/app:1")
    refresh = asyncio.ensure_future(bed.controller.refresh())
    await settle()
    # The spec changes while the refresh of generation 1 waits for the registry.
    await bed.controller.resolve(NS, "c", 2, _spec("reg.example/web:1", refreshInterval="10m"),
                                 uid)
    gate.set()
    assert await refresh == 0
    state = bed.controller.caches[key]
    assert (state.generation, [str(r.reference) for r in state.resolved]) == (
        2, ["reg.example/web:1"])
    await bed.controller.replan()
    assert WEB.digest in bed.node_layers("n1") and APP.digest not in bed.node_layers("n1")


async def test_a_cache_whose_deletion_event_never_came_is_released(bed: Bed) -> None:
    # kopf synthesizes no DELETED for an object that vanished while its watch re-listed.
    bed.kube.dockerconfig_secret(NS, "pull", {"reg.example": {"auth": "dXNlcjpwYXNz"}})
    await bed.create("c", _spec("reg.example/app:1", pullSecrets=[{"name": "pull"}]))
    await bed.controller.replan()
    assert bed.node_layers("n1") == bed.node_layers("n2") != set()
    bed.kube.delete_cache(NS, "c")  # and no `forget`
    assert await bed.controller.replan() == {"n1": True, "n2": True}
    assert bed.node_layers("n1") == bed.node_layers("n2") == set()
    credentials = bed.kube.secrets[("layercache-system", "layercache-registry-credentials")]
    assert f"{NS}/c" not in credentials["data"][CREDENTIALS_KEY]


def _recreate(bed: Bed, name: str, spec: dict[str, Any], uid: str) -> None:
    """LayerCache ``name`` deleted and created again: the same name, a new object ``uid``."""
    bed.kube.delete_cache(NS, name)
    bed.kube.add_cache(NS, name, spec)["metadata"]["uid"] = uid


async def test_a_cache_created_again_is_kept_whichever_deletion_event_comes_first(
        bed: Bed) -> None:
    # kopf queues events per object (uid): the new object's create handler may run before
    # or after the old object's DELETED is handled, and each may end while the other runs.
    await bed.create("c", _spec("reg.example/app:1"))
    await bed.create("d", _spec("reg.example/tool:1"))
    await bed.controller.replan()
    await bed.controller.aggregate()
    old = bed.controller.caches[f"{NS}/c"].uid
    assert bed.controller.caches[f"{NS}/c"].last_status
    spec = _spec("reg.example/web:1")
    gate = _hold_lookups(bed, "reg.example/web:1")
    _recreate(bed, "c", spec, "uid-new")
    created = asyncio.ensure_future(bed.controller.resolve(NS, "c", 1, spec, "uid-new"))
    await settle()
    bed.controller.forget(NS, "c", old)  # the old object's DELETED, mid-resolution
    gate.set()
    await created
    assert bed.controller.caches[f"{NS}/c"].uid == "uid-new"
    assert bed.controller.caches[f"{NS}/c"].last_status is None  # nothing of the old one's
    # and the replan is not left waiting for a cache nothing would resolve again
    assert await bed.controller.replan() != {}
    assert WEB.digest in bed.node_layers("n1") and APP.digest not in bed.node_layers("n1")


async def test_a_deleted_objects_late_resolution_never_replaces_its_successor(bed: Bed) -> None:
    await bed.create("c", _spec("reg.example/app:1"))
    old = bed.controller.caches[f"{NS}/c"].uid
    gate = _hold_lookups(bed, "reg.example/tool:1")
    update = asyncio.ensure_future(bed.controller.resolve(
        NS, "c", 2, _spec("reg.example/tool:1"), old))  # the old object's update handler
    await settle()
    spec = _spec("reg.example/web:1")
    _recreate(bed, "c", spec, "uid-new")
    await bed.controller.resolve(NS, "c", 1, spec, "uid-new")  # the new object's worker
    gate.set()
    await update  # ends before its object's DELETED is handled (the same kopf worker)
    bed.controller.forget(NS, "c", old)
    assert bed.controller.caches[f"{NS}/c"].uid == "uid-new"
    await bed.controller.replan()
    assert WEB.digest in bed.node_layers("n1") and TOOL.digest not in bed.node_layers("n1")


async def test_a_refresh_ending_after_its_cache_was_created_again_is_dropped(bed: Bed) -> None:
    await bed.create("c", _spec("reg.example/app:1", refreshInterval="10m"))
    old = bed.controller.caches[f"{NS}/c"].uid
    await bed.clock.advance(600)
    gate = _hold_lookups(bed, "reg.example/app:1")
    refresh = asyncio.ensure_future(bed.controller.refresh())
    await settle()
    bed.controller.forget(NS, "c", old)
    spec = _spec("reg.example/web:1")
    _recreate(bed, "c", spec, "uid-new")
    await bed.controller.resolve(NS, "c", 1, spec, "uid-new")
    gate.set()
    assert await refresh == 0
    assert bed.controller.caches[f"{NS}/c"].uid == "uid-new"


async def test_three_objects_of_one_name_end_with_the_living_one_at_its_newest_generation(
        bed: Bed) -> None:
    # Z (the first object) has an update waiting for the registry when it is deleted; Y is
    # created and deleted; F is created, refreshes its tags and is changed, and stays. Late
    # resolutions of Z and Y and a refresh of F's first generation end after all that.
    await bed.create("c", _spec("reg.example/app:1"))
    key, z = f"{NS}/c", bed.controller.caches[f"{NS}/c"].uid
    held_z = _hold_lookups(bed, "reg.example/tool:1")
    update_z = asyncio.ensure_future(bed.controller.resolve(
        NS, "c", 2, _spec("reg.example/tool:1"), z))
    await settle()
    bed.registry.images[("reg.example/y:1", str(AMD64))] = _image("reg.example/y:1", BASE)
    _recreate(bed, "c", _spec("reg.example/y:1"), "uid-y")
    held_y = _hold_lookups(bed, "reg.example/y:1")
    create_y = asyncio.ensure_future(bed.controller.resolve(
        NS, "c", 1, _spec("reg.example/y:1"), "uid-y"))
    await settle()
    first = _spec("reg.example/web:1", refreshInterval="10m")
    _recreate(bed, "c", first, "uid-f")
    await bed.controller.resolve(NS, "c", 1, first, "uid-f")
    await bed.clock.advance(600)
    held_f = _hold_lookups(bed, "reg.example/web:1")
    refresh = asyncio.ensure_future(bed.controller.refresh())  # of F's generation 1
    await settle()
    await bed.controller.resolve(NS, "c", 2, _spec("reg.example/app:1", refreshInterval="10m"),
                                 "uid-f")
    for gate, late in ((held_z, update_z), (held_y, create_y), (held_f, refresh)):
        gate.set()
        await late
    bed.controller.forget(NS, "c", "uid-y")  # each DELETED after its object's handlers
    bed.controller.forget(NS, "c", z)
    state = bed.controller.caches[key]
    assert (state.uid, state.generation) == ("uid-f", 2)
    await bed.controller.replan()
    assert APP.digest in bed.node_layers("n1") and WEB.digest not in bed.node_layers("n1")


async def test_one_reference_in_two_caches_resolving_together_is_looked_up_once(
        bed: Bed) -> None:
    gate, inner = asyncio.Event(), bed.registry.lookups

    @asynccontextmanager
    async def slow_lookups() -> AsyncIterator[Any]:
        async with inner() as lookup:
            async def waiting(*args: Any) -> ResolvedImage:
                await gate.wait()  # both caches ask before the registry answers
                return await lookup(*args)
            yield waiting

    bed.registry.lookups = slow_lookups  # type: ignore[method-assign]
    first = asyncio.ensure_future(bed.create("a", _spec("reg.example/app:1")))
    second = asyncio.ensure_future(bed.create("b", _spec("reg.example/app:1",
                                                         "reg.example/web:1")))
    await settle()
    gate.set()
    await asyncio.gather(first, second)
    assert bed.registry.lookups_made == {("reg.example/app:1", str(AMD64)): 1,
                                         ("reg.example/web:1", str(AMD64)): 1}
    for name in ("a", "b"):
        resolved = bed.controller.caches[f"{NS}/{name}"].resolved
        assert "reg.example/app:1" in [str(r.reference) for r in resolved]


async def test_warm_round_reads_nodes_from_their_events_not_a_list(bed: Bed) -> None:
    listed = []
    bed.kube.node_warmth = lambda: listed.append(1) or []  # type: ignore[method-assign]
    await bed.controller.warm.run_once()
    assert len(listed) == 1  # no Node event yet: listed
    bed.controller.node_event("ADDED", {"metadata": {"name": "n1", "labels": {"pool": "a"},
                                                     "creationTimestamp": "2026-12-07T05:00:00Z"},
                                        "spec": {}})
    bed.controller.node_event("ADDED", {"metadata": {}, "spec": {}})  # unreadable: skipped
    for _ in range(3):
        await bed.controller.warm.run_once()
    assert len(listed) == 1  # the events are what the rounds read
    assert bed.controller.warm._nodes is not None
    assert set(bed.controller.warm._nodes) == {"n1", "?"}
    bed.controller.node_event("DELETED", {"metadata": {"name": "n1"}})
    assert set(bed.controller.warm._nodes) == {"?"}
