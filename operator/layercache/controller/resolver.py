"""Resolving a LayerCache: its images, their credentials, each for each platform.

Images are the spec's and those of the Pods ``imagesFrom`` selects; each is resolved as a
node's containerd would pull it.

`CacheResolver.resolve` makes the cache's new `CacheState`; it reads Kubernetes through
the `KubePort` (Pods, ServiceAccounts, pull Secrets, Nodes for their platforms) and images
through an `ImageRegistry`: `RegistryImages` (layercache.registry) in the operator, a
dict in the unit tests. It never raises for bad input: it is recorded in the state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final

from layercache.api import Reason, failure_reason
from layercache.api.conditions import now_iso
from layercache.api.spec import CacheSpec, InvalidSpecError, parse_spec
from layercache.controller.ports import (
    ImageLookup,
    ImageRegistry,
    KubePort,
    SecretMissingError,
)
from layercache.controller.settings import OperatorSettings
from layercache.controller.state import CacheState, ImageError, SecretRef
from layercache.metrics import OperatorMetrics
from layercache.oci.platform import Platform
from layercache.oci.reference import InvalidReferenceError, Reference, parse_reference
from layercache.oci.resolved import ResolvedImage
from layercache.registry.client import RegistryClient
from layercache.registry.credentials import (
    DockerConfig,
    InvalidDockerConfigError,
    candidate_keyrings,
    first_accepted,
)
from layercache.registry.errors import RegistryError, TransientError, retry_after
from layercache.registry.hosts import RegistryHosts
from layercache.registry.resolve import resolve
from layercache.registry.retry import RetryPolicy

__all__ = ["RESOLVE_MAX_WAIT_SECONDS", "CacheResolver", "RegistryImages"]

log = logging.getLogger(__name__)
#: Resolutions run in kopf handlers and the refresh loop: a longer ``Retry-After`` than this
#: (seconds) is not slept there but ends the attempt, and the cache is resolved again later.
RESOLVE_MAX_WAIT_SECONDS: Final = 10.0
_LookupKey = tuple[Reference, Platform, tuple[str, ...]]


class RegistryImages:
    """The `ImageRegistry` of the operator: `layercache.registry` with the settings' hosts.

    One per process, shared by every resolution: a rate-limited registry is waited for
    once, HEAD support is learned once, requests are counted by host and code (``metrics``).
    """

    def __init__(self, settings: OperatorSettings, metrics: OperatorMetrics) -> None:
        self.settings = settings
        self.hosts = RegistryHosts(metrics.registry_requests.request)
        self.retry = RetryPolicy(max_retry_after=RESOLVE_MAX_WAIT_SECONDS)

    @asynccontextmanager
    async def lookups(self) -> AsyncIterator[ImageLookup]:
        """One `RegistryClient`; each lookup tries the image's credentials until accepted.

        An image whose tag still points at the digest resolved before costs one HEAD
        (`layercache.registry.resolve.resolve` with ``previous``).
        """
        registries, default = self.settings.registry_options()
        async with RegistryClient(registries=registries, default=default,
                                  retry=self.retry, hosts=self.hosts) as client:
            async def lookup(ref: Reference, platform: Platform,
                             configs: Sequence[DockerConfig],
                             previous: ResolvedImage | None) -> ResolvedImage:
                keyrings = candidate_keyrings(list(configs), ref.registry)
                return await first_accepted(
                    keyrings, lambda: resolve(client, ref, platform, previous))
            yield lookup


class CacheResolver:
    """Makes a cache's `CacheState` from its spec: images, credentials, resolutions."""

    def __init__(self, kube: KubePort, images: ImageRegistry, settings: OperatorSettings,
                 metrics: OperatorMetrics, clock: Callable[[], float]) -> None:
        self.kube, self.images, self.settings = kube, images, settings
        self.metrics, self.clock = metrics, clock
        #: Lookups in flight by (reference, platform, the configs' sources): a cache that
        #: needs one another cache is resolving awaits it instead of asking again.
        self._inflight: dict[_LookupKey, asyncio.Future[ResolvedImage]] = {}

    async def resolve(self, state: CacheState, before: CacheState | None) -> CacheState:
        """Parse ``state``'s spec and resolve every image for every platform; returns it.

        ``state`` is new (`CacheState.begin`), ``before`` the cache's previous state, whose
        resolutions an unchanged tag reuses. An invalid spec sets `invalid`; an image that
        fails adds an `ImageError` (the other images still resolve); a transient failure
        marks the state for an early retry.
        """
        try:
            state.accept_spec(parse_spec(state.key, state.raw_spec))
        except InvalidSpecError as e:
            state.reject(str(e))
            return state
        spec = state.spec
        assert spec is not None
        known = {(r.reference, r.platform): r for r in before.resolved} if before else {}
        refs, bad = await self._references(state, spec)
        state.add_errors(bad)
        configs, all_configs, secret_errors = await self._docker_configs(state, spec, refs)
        state.use_configs(all_configs)
        state.add_errors(secret_errors)
        platforms = list(spec.platforms) or await self._node_platforms(spec)
        limit = asyncio.Semaphore(self.settings.resolve_concurrency)
        async with self.images.lookups() as lookup:
            async def one(ref: Reference, platform: Platform) -> ResolvedImage | ImageError:
                # This image's own credentials only, each tried until one is accepted.
                async with limit:
                    try:
                        return await self._shared(lookup, ref, platform, configs[ref],
                                                  known.get((ref, platform)))
                    except TransientError as e:
                        state.note_transient(retry_after(e))
                        return ImageError(str(ref), str(platform),
                                          failure_reason(e, "resolve"), str(e))
                    except RegistryError as e:
                        return ImageError(str(ref), str(platform),
                                          failure_reason(e, "resolve"), str(e))
            results = await asyncio.gather(*(one(r, p) for r in refs for p in platforms))
        failed = [r for r in results if isinstance(r, ImageError)]
        for error in failed:
            self.metrics.resolve_errors.labels(error.reason).inc()
        state.add_errors(failed)
        state.finish([r for r in results if isinstance(r, ResolvedImage)], self.clock(),
                     now_iso())
        return state

    async def _shared(self, lookup: ImageLookup, ref: Reference, platform: Platform,
                      configs: Sequence[DockerConfig], previous: ResolvedImage | None
                      ) -> ResolvedImage:
        """``lookup(...)``, or the same lookup another cache has in flight.

        The same reference and platform with configs from the same Secrets resolve once
        per pass however many caches name it. Raises what the lookup raises
        (`layercache.registry.errors.RegistryError`); if the other cache's session ended
        under it (that resolution was cancelled), this one looks up itself.
        """
        key = (ref, platform, tuple(config.source for config in configs))
        running = self._inflight.get(key)
        if running is not None:
            try:
                return await asyncio.shield(running)
            except RegistryError:
                raise
            except Exception:  # not a registry's answer: the other session ended
                log.debug("shared lookup of %s ended; looking up again", ref)
        task = asyncio.ensure_future(lookup(ref, platform, configs, previous))
        self._inflight[key] = task

        def done(_: object) -> None:
            if self._inflight.get(key) is task:
                del self._inflight[key]
            if not task.cancelled():
                task.exception()  # retrieved: whoever awaited it has it, or nobody needs it
        task.add_done_callback(done)
        # Shielded: cancelling this resolution must not cancel the lookup others await.
        return await asyncio.shield(task)

    async def _references(self, state: CacheState, spec: CacheSpec
                          ) -> tuple[dict[Reference, list[SecretRef]], list[ImageError]]:
        """Every image to resolve → the pull Secrets of the Pods it was found in.

        `spec.images` come first (no Pod Secrets); for each Pod `imagesFrom` selects, its
        `imagePullSecrets` and then its ServiceAccount's, as the kubelet would use them.
        """
        refs: dict[Reference, list[SecretRef]] = {r: [] for r in spec.images}
        errors = []
        selector = spec.images_from_selector
        if selector is not None:
            namespaces = list(spec.images_from_namespaces) or [state.namespace]
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

    async def _docker_configs(self, state: CacheState, spec: CacheSpec,
                              refs: Mapping[Reference, list[SecretRef]]
                              ) -> tuple[dict[Reference, list[DockerConfig]], list[str],
                                         list[ImageError]]:
        """Per image, the Docker configs to try, in order; all of them as JSON text; errors.

        The cache's own `pullSecrets` (in its namespace) come first, then the image's Pod
        Secrets. A missing or invalid own pull Secret is an error of the cache; a Pod's
        missing Secret is skipped, as the kubelet skips it.
        """
        read: dict[SecretRef, tuple[str, DockerConfig] | None] = {}
        errors = []
        own = [(state.namespace, name) for name in spec.pull_secrets]
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
        return sorted({n.os_arch for n in nodes if spec.targets(n.labels, n.taints)}, key=str)
