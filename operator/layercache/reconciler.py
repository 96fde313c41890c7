"""The operator's core loop: resolve each cache, plan the cluster, write node specs, report.

Handlers (layercache.handlers) feed it: a LayerCache created/changed/refreshed →
`resolve()`; anything that changes the plan (caches, nodes, agents' inventories) →
`trigger()`. One background task turns triggers into at most one replan per debounce
window, so a burst of events costs one plan and only changed `NodeLayerCache` specs are
written. Only the replica holding the operator's Lease runs kopf and these loops
(layercache.leadership), so a second replica never writes anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry

from layercache.api import (
    LC_KIND,
    InvalidObjectError,
    LayerCacheStatus,
    NodeLayerCacheSpec,
    NodeLayerCacheStatus,
    Reason,
    failure_reason,
)
from layercache.backoff import Backoff
from layercache.conditions import now_iso
from layercache.digest import Digest
from layercache.distribute import CachePlan, distribute, node_spec, previous_assignments
from layercache.kube import KubeApi, NodeInfo, SecretMissingError
from layercache.metrics import OperatorMetrics
from layercache.planner import Node, Plan, PlanInputError, PlanOptions, plan
from layercache.platform import Platform, parse_platform
from layercache.reference import InvalidReferenceError, Reference, parse_reference
from layercache.registry.client import RegistryClient
from layercache.registry.credentials import (
    DockerConfig,
    InvalidDockerConfigError,
    candidate_keyrings,
    first_accepted,
)
from layercache.registry.errors import RegistryError, TransientError, retry_after
from layercache.registry.hosts import RegistryHosts
from layercache.registry.resolve import ResolvedImage, resolve
from layercache.registry.retry import RetryPolicy
from layercache.settings import OperatorSettings
from layercache.spec import CacheSpec, InvalidSpecError, parse_spec
from layercache.status import cache_status, foreign_layers

__all__ = ["CREDENTIALS_KEY", "CacheState", "ImageError", "Reconciler"]

log = logging.getLogger(__name__)
#: Waits before retrying a failed replan: 2 s doubling to 10 s, started over by a success.
REPLAN_BACKOFF: Final = Backoff(2.0, 10.0)
#: Seconds before a cache whose resolution failed transiently is resolved again (at least:
#: a server's longer ``Retry-After`` pushes it back).
TRANSIENT_RETRY_SECONDS = 30.0
#: Resolutions run in kopf handlers and the refresh loop: a longer ``Retry-After`` than this
#: (seconds) is not slept there but ends the attempt, and the cache is resolved again later.
RESOLVE_MAX_WAIT_SECONDS = 10.0
#: Data key of the agents' credentials Secret: JSON ``{"namespace/name": [config, ...]}``,
#: each config a Docker config object (``{"auths": ...}``) the cache may use, in the
#: order they are tried (layercache.agent.secrets reads it).
CREDENTIALS_KEY = "caches.json"
#: A pull Secret by (namespace, name).
SecretRef = tuple[str, str]


@dataclass(frozen=True)
class ImageError:
    """An image that could not be resolved: which, for which platform, why (CamelCase)."""

    reference: str
    platform: str
    reason: str
    message: str


@dataclass
class CacheState:
    """What the operator knows of one LayerCache between handler calls."""

    namespace: str
    name: str
    generation: int
    spec: CacheSpec | None = None
    invalid: str | None = None
    resolved: list[ResolvedImage] = field(default_factory=list)
    errors: list[ImageError] = field(default_factory=list)
    #: Every Docker config (JSON text) this cache may use, in the order they are tried:
    #: its own pullSecrets, then those of the Pods and ServiceAccounts imagesFrom found.
    docker_configs: list[str] = field(default_factory=list)
    resolved_at: float = 0.0
    resolved_time: str | None = None
    plan: Plan | None = None
    desired_nodes: tuple[str, ...] | None = None  # None until the first plan
    last_status: dict[str, Any] | None = None
    retry_transient: bool = False
    #: The longest ``Retry-After`` (seconds) among this resolution's transient failures.
    retry_after: float = 0.0
    raw_spec: Mapping[str, Any] = field(default_factory=dict)
    uid: str = ""
    #: Per node, the agent's (upstream, peer) byte counters when this cache first planned
    #: there; the cache's own bytes are what the counters grew by since (plus `carried`).
    baseline: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: (upstream, peer) bytes reported before an operator restart, kept across it.
    carried: tuple[int, int] = (0, 0)
    #: True once a replan has written node specs for this resolution; before that, node
    #: statuses say nothing about it.
    planned: bool = False
    #: Digests of foreign / non-distributable layers already reported by an Event.
    reported_foreign: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        """"namespace/name"."""
        return f"{self.namespace}/{self.name}"

    def digests(self) -> dict[tuple[str, str], Digest]:
        """(reference, platform) → resolved digest, to notice a moved tag."""
        return {(str(r.reference), str(r.platform)): r.digest for r in self.resolved}


class Reconciler:
    """Holds every cache's state and plans the cluster; see the module docstring."""

    def __init__(self, kube: KubeApi, settings: OperatorSettings,
                 registry: CollectorRegistry | None = None) -> None:
        self.kube = kube
        self.settings = settings
        self.caches: dict[str, CacheState] = {}
        # Registration already collects once, so the state it reads must exist first.
        self.metrics = OperatorMetrics(registry or CollectorRegistry(), lambda: [
            (s.key, s.last_status) for s in list(self.caches.values()) if s.last_status])
        self._dirty = asyncio.Event()
        self._credentials: str | None = None  # the last written CREDENTIALS_KEY value
        # One per process, shared by every resolution: a rate-limited registry is waited
        # for once, HEAD support is learned once, requests are counted by host and code.
        self.hosts = RegistryHosts(self.metrics.registry_requests.request)
        self.retry = RetryPolicy(max_retry_after=RESOLVE_MAX_WAIT_SECONDS)

    # -- resolution -----------------------------------------------------------------
    async def resolve(self, namespace: str, name: str, generation: int,
                      raw_spec: Mapping[str, Any], uid: str = "",
                      stored_status: Mapping[str, Any] | None = None) -> CacheState:
        """Parse the spec and resolve every image for every platform; store and return it.

        Never raises for bad input: an invalid spec sets `invalid`, an image that fails
        adds an `ImageError` (the other images still resolve). What the previous state knew
        (status written, nodes, byte baselines) carries over; after an operator restart,
        `stored_status` (the object's status) seeds it, so nothing flaps or restarts at 0.
        An image whose tag still points at the digest resolved before costs one HEAD
        (`layercache.registry.resolve.resolve` with ``previous``).
        """
        state = CacheState(namespace, name, generation, raw_spec=dict(raw_spec), uid=uid)
        before = self.caches.get(state.key)
        known = {(r.reference, r.platform): r for r in before.resolved} if before else {}
        if before is not None:
            state.last_status, state.desired_nodes = before.last_status, before.desired_nodes
            state.baseline, state.carried = before.baseline, before.carried
            state.reported_foreign = before.reported_foreign
        elif stored_status:
            state.last_status = dict(stored_status)
            try:
                stored = LayerCacheStatus.from_dict(stored_status, LC_KIND, state.key, "status")
            except InvalidObjectError as unreadable:  # counting restarts at 0, no more
                log.warning("%s; stored counters not carried over", unreadable)
                stored = LayerCacheStatus()
            state.carried = (stored.bytes.upstream, stored.bytes.peer)
            state.reported_foreign = frozenset(
                entry.digest for entry in stored.non_distributable_layers)
        try:
            state.spec = parse_spec(state.key, raw_spec)
        except InvalidSpecError as e:
            state.invalid = str(e)
            self.caches[state.key] = state
            return state
        spec = state.spec
        refs, bad = await self._references(state)
        state.errors += bad
        configs, state.docker_configs, secret_errors = await self._docker_configs(state, refs)
        state.errors += secret_errors
        platforms = list(spec.platforms) or await self._node_platforms(spec)
        registries, default = self.settings.registry_options()
        limit = asyncio.Semaphore(self.settings.resolve_concurrency)
        async with RegistryClient(registries=registries, default=default,
                                  retry=self.retry, hosts=self.hosts) as client:
            async def one(ref: Reference, platform: Platform) -> ResolvedImage | ImageError:
                # This image's own credentials only, each tried until one is accepted.
                keyrings = candidate_keyrings(configs[ref], ref.registry)
                async with limit:
                    try:
                        return await first_accepted(
                            keyrings,
                            lambda: resolve(client, ref, platform, known.get((ref, platform))))
                    except TransientError as e:
                        state.retry_transient = True
                        state.retry_after = max(state.retry_after, retry_after(e) or 0.0)
                        return ImageError(str(ref), str(platform),
                                          failure_reason(e, "resolve"), str(e))
                    except RegistryError as e:
                        return ImageError(str(ref), str(platform),
                                          failure_reason(e, "resolve"), str(e))
            results = await asyncio.gather(*(one(r, p) for r in refs for p in platforms))
        state.resolved = [r for r in results if isinstance(r, ResolvedImage)]
        failed = [r for r in results if isinstance(r, ImageError)]
        for error in failed:
            self.metrics.resolve_errors.labels(error.reason).inc()
        state.errors += failed
        state.resolved_at, state.resolved_time = time.monotonic(), now_iso()
        self.caches[state.key] = state
        await self._report_foreign(state)
        return state

    async def _report_foreign(self, state: CacheState) -> None:
        """One ``NonDistributableLayers`` Event for foreign layers not reported before.

        Such layers are never planned (`ResolvedImage.plan_input`) and never block Ready;
        status lists them (`layercache.status.foreign_layers`), the Event says so once.
        """
        found = foreign_layers(state)
        new = [entry for entry in found if entry["digest"] not in state.reported_foreign]
        if not new:
            return
        listed = ", ".join(f"{e['image']}: {Digest(e['digest']).short} ({e['mediaType']})"
                           for e in new[:5])
        more = f" and {len(new) - 5} more" if len(new) > 5 else ""
        try:
            await asyncio.to_thread(
                self.kube.post_event, state.namespace, state.name, state.uid,
                "NonDistributableLayers",
                f"{len(new)} foreign / non-distributable layer(s) not cached (the runtime "
                f"fetches them from their URLs): {listed}{more}")
        except Exception:
            log.exception("NonDistributableLayers event for %s not posted", state.key)
            return
        state.reported_foreign = state.reported_foreign | {e["digest"] for e in new}

    async def _references(self, state: CacheState
                          ) -> tuple[dict[Reference, list[SecretRef]], list[ImageError]]:
        """Every image to resolve → the pull Secrets of the Pods it was found in.

        `spec.images` come first (no Pod Secrets); for each Pod `imagesFrom` selects, its
        `imagePullSecrets` and then its ServiceAccount's, as the kubelet would use them.
        """
        assert state.spec is not None
        refs: dict[Reference, list[SecretRef]] = {r: [] for r in state.spec.images}
        errors = []
        selector = state.spec.images_from_selector
        if selector is not None:
            namespaces = list(state.spec.images_from_namespaces) or [state.namespace]
            pods = await asyncio.to_thread(self.kube.pods, namespaces, selector)
            accounts: dict[SecretRef, list[str]] = {}
            for pod in sorted(pods, key=lambda p: (p.namespace, p.name)):
                account = (pod.namespace, pod.service_account)
                if account not in accounts:
                    accounts[account] = await asyncio.to_thread(
                        self.kube.service_account_pull_secrets, *account)
                secrets = [(pod.namespace, name) for name in
                           (*pod.pull_secrets, *accounts[account])]
                for text in pod.images:
                    try:
                        ref = parse_reference(text)
                    except InvalidReferenceError as e:
                        errors.append(ImageError(text, "", Reason.INVALID_REFERENCE, str(e)))
                        continue
                    known = refs.setdefault(ref, [])
                    known += [s for s in secrets if s not in known]
        return refs, errors

    async def _docker_configs(self, state: CacheState,
                              refs: Mapping[Reference, list[SecretRef]]
                              ) -> tuple[dict[Reference, list[DockerConfig]], list[str],
                                         list[ImageError]]:
        """Per image, the Docker configs to try, in order; all of them as JSON text; errors.

        The cache's own `pullSecrets` (in its namespace) come first, then the image's Pod
        Secrets. A missing or invalid own pull Secret is an error of the cache; a Pod's
        missing Secret is skipped, as the kubelet skips it.
        """
        assert state.spec is not None
        read: dict[SecretRef, tuple[str, DockerConfig] | None] = {}
        errors = []
        own = [(state.namespace, name) for name in state.spec.pull_secrets]
        for ref in [*own, *(s for secrets in refs.values() for s in secrets)]:
            if ref in read:
                continue
            read[ref] = None
            try:
                text = await asyncio.to_thread(self.kube.docker_config, *ref)
                read[ref] = text, DockerConfig.from_json(text, f"Secret {ref[0]}/{ref[1]}")
            except (SecretMissingError, InvalidDockerConfigError) as e:
                if ref in own:
                    reason = (Reason.PULL_SECRET_MISSING if isinstance(e, SecretMissingError)
                              else Reason.PULL_SECRET_INVALID)
                    errors.append(ImageError("", "", reason, str(e)))
                else:
                    log.info("pull secret of a Pod not used: %s", e)
        per_image = {}
        for image, secrets in refs.items():
            found = (read[s] for s in dict.fromkeys([*own, *secrets]))
            per_image[image] = [c[1] for c in found if c is not None]
        return per_image, list(dict.fromkeys(c[0] for c in read.values() if c)), errors

    async def _node_platforms(self, spec: CacheSpec) -> list[Platform]:
        nodes = await asyncio.to_thread(self.kube.nodes)
        return sorted({_node_platform(n) for n in nodes if spec.targets(n.labels, n.taints)},
                      key=str)

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted cache; the next replan releases what only it wanted."""
        self.caches.pop(f"{namespace}/{name}", None)

    def due_for_refresh(self, key: str) -> bool:
        """Whether cache `key`'s tags should be resolved again (refreshInterval passed)."""
        state = self.caches.get(key)
        if state is None or state.spec is None or state.spec.paused:
            return False
        # Transient failures (connection, 5xx, 429) may succeed soon, bad input will not; a
        # server that said when to come back (Retry-After) is not asked before.
        wait = (max(TRANSIENT_RETRY_SECONDS, state.retry_after) if state.retry_transient
                else state.spec.refresh_seconds)
        return time.monotonic() - state.resolved_at >= wait

    async def refresh_forever(self, interval: float = 15.0) -> None:
        """Every `interval` seconds, re-resolve caches whose refreshInterval has passed.

        A loop of our own rather than a kopf timer: kopf guards timers with a finalizer,
        and a finalizer would block deleting a LayerCache while the operator is down.
        References that now resolve to new digests get a `TagMoved` Event. Failures are
        logged; the loop never ends.
        """
        while True:
            await asyncio.sleep(interval)
            for key in [k for k in list(self.caches) if self.due_for_refresh(k)]:
                old = self.caches[key]
                try:
                    new = await self.resolve(old.namespace, old.name, old.generation,
                                             old.raw_spec, old.uid)
                except Exception:
                    log.exception("refresh of LayerCache %s failed; retrying later", key)
                    continue
                new.last_status = old.last_status
                before = old.digests()
                moved = sorted(f"{ref} ({platform})" for (ref, platform), digest
                               in new.digests().items() if before.get((ref, platform)) != digest)
                if moved:
                    try:
                        await asyncio.to_thread(
                            self.kube.post_event, new.namespace, new.name, new.uid, "TagMoved",
                            f"re-resolved: {', '.join(moved[:5])}")
                    except Exception:
                        log.exception("TagMoved event for %s not posted", key)
                self.trigger()

    # -- planning -------------------------------------------------------------------
    def trigger(self) -> None:
        """Ask for a replan (cheap; many triggers in one debounce window make one plan)."""
        self._dirty.set()

    async def run(self) -> None:
        """Replan whenever triggered, forever.

        A failed replan is logged and retried after `REPLAN_BACKOFF` (2 s doubling to 10 s,
        never later than the fixed 10 s it used to be); it never ends the loop.
        """
        delays = REPLAN_BACKOFF.delays()
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.settings.replan_debounce_seconds)
            self._dirty.clear()
            try:
                with self.metrics.replan_duration.time():
                    await self.replan()
                self.metrics.replans.labels("ok").inc()
                delays = REPLAN_BACKOFF.delays()
            except Exception:
                self.metrics.replans.labels("error").inc()
                delay = next(delays)
                log.exception("replan failed; retrying in %.0f s", delay)
                await asyncio.sleep(delay)
                self._dirty.set()

    async def replan(self) -> dict[str, bool]:
        """Plan every cache over the current nodes and write changed node specs.

        Returns node name → whether its NodeLayerCache was written. Until every existing
        LayerCache has been resolved once (after a restart, kopf resumes them one by one),
        nothing is planned: a plan without a cache would strip its layers from every spec,
        and the agents would release them. Each resolution triggers a replan.
        """
        pending = await asyncio.to_thread(self.kube.layer_cache_keys) - set(self.caches)
        if pending:
            log.info("replan waits for %d LayerCache(s) not resolved yet: %s", len(pending),
                     ", ".join(sorted(pending)[:5]))
            return {}
        nodes = await asyncio.to_thread(self.kube.nodes)
        existing = await asyncio.to_thread(self.kube.node_layer_caches)
        present = {name: _held(obj) for name, obj in existing.items()}
        plans, planned = [], list(self.caches.values())
        for state in sorted(planned, key=lambda s: s.key):
            cache_plan = self._plan_cache(state, nodes, present)
            if cache_plan is not None:
                plans.append(cache_plan)
                # Counters as they stand before this cache's layers reach a node's spec:
                # nothing fetched for it can be in them yet.
                for name in state.desired_nodes or ():
                    state.baseline.setdefault(name, _counters(existing.get(name)))
        previous = previous_assignments({n: o.get("spec") or {} for n, o in existing.items()})
        per_node = distribute(plans, present, previous)
        written = {}
        node_names = {n.name for n in nodes}
        self.metrics.planned({n: len(per_node.get(n, [])) for n in node_names})
        for name in sorted(node_names | set(existing)):
            if name not in node_names:
                await asyncio.to_thread(self.kube.delete_node_cache, name)
                continue
            spec = node_spec(name, per_node.get(name, []), plans)
            if name not in per_node and name not in existing:
                continue  # no cache wants anything there: no object needed
            written[name] = await asyncio.to_thread(self.kube.write_node_spec,
                                                    existing.get(name), name, spec)
        await self._write_credentials()
        for state in planned:
            state.planned = True
        self.metrics.spec_writes.inc(sum(written.values()))
        return written

    def _plan_cache(self, state: CacheState, nodes: list[NodeInfo],
                    present: Mapping[str, frozenset[Digest]]) -> CachePlan | None:
        if state.spec is None:
            return None
        spec = state.spec
        targets = [n for n in nodes if spec.targets(n.labels, n.taints) and not n.unschedulable]
        state.desired_nodes = tuple(sorted(n.name for n in targets))
        plan_nodes = [Node(n.name, _node_platform(n), n.labels,
                           present.get(n.name, frozenset()), spec.max_bytes_per_node)
                      for n in targets]
        images = [r.plan_input() for r in state.resolved]
        try:
            # Mode Images pulls whole images, which unpacks every prefix of them anyway.
            chain_min = 1 if spec.mode == "Images" else None
            state.plan = plan(images, plan_nodes, PlanOptions(spec.min_shared_by, chain_min))
        except PlanInputError as e:
            state.invalid = f"LayerCache {state.key}: plan: {e}"
            state.plan = None
            return None
        repositories = {layer.digest: f"{r.reference.registry}/{r.reference.repository}"
                        for r in state.resolved for layer in r.layers}
        images_mode = tuple(
            (str(r.pinned), frozenset(layer.digest for layer in r.distributable))
            for r in state.resolved) if spec.mode == "Images" else ()
        image_layers: dict[Platform, set[tuple[Digest, ...]]] = {}
        for image in images:  # per platform, each distinct layer list once
            image_layers.setdefault(image.platform, set()).add(
                tuple(layer.digest for layer in image.layers))
        # Sorted: the order images resolve in must not rewrite node specs.
        return CachePlan(state.key, state.plan, repositories, images_mode, spec.paused,
                         {p: tuple(sorted(lists)) for p, lists in image_layers.items()})

    async def _write_credentials(self) -> None:
        """Write the agents' credentials Secret: each cache's configs under its own key.

        Never merged across caches: two caches with different credentials for one
        registry each keep theirs, and an agent fetches a layer only with the credentials
        of a cache that wants it (layercache.agent.secrets).
        """
        by_cache = {key: [json.loads(text) for text in state.docker_configs]
                    for key, state in sorted(self.caches.items()) if state.docker_configs}
        value = json.dumps(by_cache, sort_keys=True)
        if value != self._credentials:
            await asyncio.to_thread(
                self.kube.write_secret, self.settings.namespace,
                self.settings.credentials_secret, {CREDENTIALS_KEY: value}, "Opaque")
            self._credentials = value

    # -- status ---------------------------------------------------------------------
    async def aggregate(self) -> int:
        """Write each cache's status from its nodes' NodeLayerCache status; returns writes."""
        existing = await asyncio.to_thread(self.kube.node_layer_caches)
        writes = 0
        for state in list(self.caches.values()):
            if not state.planned and state.last_status is not None:
                # Resumed or changed, not planned yet: the status written before stands
                # until node specs reflect this resolution (no flapping, no early Ready).
                continue
            status = cache_status(state, existing, state.last_status)
            if status != state.last_status:
                try:
                    await asyncio.to_thread(self.kube.patch_cache_status, state.namespace,
                                            state.name, status)
                except Exception:  # one cache's failure (e.g. just deleted) stops no other
                    log.exception("status of LayerCache %s not written", state.key)
                    continue
                state.last_status = status
                writes += 1
        return writes


def _counters(obj: Mapping[str, Any] | None) -> tuple[int, int]:
    """A NodeLayerCache's (upstream, peer) byte counters, (0, 0) when it has none."""
    counted = NodeLayerCacheStatus.of(obj).bytes
    return counted.upstream, counted.peer


def _node_platform(node: NodeInfo) -> Platform:
    return parse_platform(f"{node.platform.os}/{node.platform.architecture}")


def _held(obj: Mapping[str, Any]) -> frozenset[Digest]:
    """Digests a node's agent reports holding: what its spec wants minus what is missing.

    Nothing when the agent has not reported an inventory yet, or the object does not read
    (`layercache.api.InvalidObjectError`, logged: one bad object stops no replan).
    """
    status = NodeLayerCacheStatus.of(obj)
    if not status.synced:
        return frozenset()
    name = str((obj.get("metadata") or {}).get("name", ""))
    try:
        spec = NodeLayerCacheSpec.read(name, obj.get("spec"))
    except InvalidObjectError as error:
        log.warning("%s; node read as holding nothing", error)
        return frozenset()
    missing = set(status.missing)
    return frozenset(Digest(layer.digest) for layer in spec.layers
                     if layer.digest not in missing)
