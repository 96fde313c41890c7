"""``mode: Images``: pull whole images through CRI once their layers are held.

An image in ``spec.images`` is a reference pinned by digest, with its layers for this
node's platform as the operator resolved them (``spec.images[].layers``); from an operator
older than that field the agent resolves it itself (`layercache.registry.resolve`: the
manifest and config only, a few kilobytes). Once the content store holds every layer, CRI
``PullImage`` names the image — containerd then fetches only the manifest and config again
and unpacks from the local blobs, as the kubelet's later pull would. Upstream credentials
are those of the caches that want the image (`layercache.agent.secrets.Secrets.keyrings_for`),
each tried until the registry accepts one — for a manifest ``HEAD`` when the spec gives the
layers (GET where HEAD cannot answer), for the resolution otherwise; the accepted ones go in
the CRI ``AuthConfig``.

Pulled images are remembered until `forget` (each inventory re-read), so a pass costs no
CRI call per image; failures are reported (``ImageResolveFailed``, ``ImagePullFailed``)
and retried with the reconciler's backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from layercache.agent.status.report import StatusBook
from layercache.api import Reason
from layercache.backoff import RetryTimes
from layercache.containerd.cri import AuthConfig
from layercache.containerd.errors import ContainerdError
from layercache.containerd.ports import ContentStorePort, CRIImagesPort
from layercache.oci.digest import Digest
from layercache.oci.reference import parse_reference
from layercache.registry.client import RegistryClient
from layercache.registry.credentials import Keyring, current_keyring, first_accepted
from layercache.registry.fetch import get_manifest, head_manifest
from layercache.registry.resolve import resolve

__all__ = ["ImagePuller"]

log = logging.getLogger(__name__)


class ImagePuller:
    """Pulls ready images on one node; ``platform`` (``os/arch``) is the node's."""

    def __init__(self, *, cri: CRIImagesPort, store: ContentStorePort, registry: RegistryClient,
                 keyrings: Callable[[Sequence[str], str], list[Keyring]], book: StatusBook,
                 retry: RetryTimes, platform: Callable[[], str]) -> None:
        self.cri = cri
        self.store = store
        self.registry = registry
        #: (caches, registry) → the keyrings to try (`Secrets.keyrings_for`).
        self.keyrings = keyrings
        self.book = book
        self.retry = retry
        self.platform = platform
        self.pulled: set[str] = set()
        #: image → its layers and the keyring its resolution was accepted with.
        self._layers: dict[str, tuple[tuple[Digest, ...], Keyring]] = {}

    def pending(self, images: Iterable[str]) -> int:
        """How many of ``images`` are not known to be pulled."""
        return sum(1 for image in images if image not in self.pulled)

    def forget(self) -> None:
        """Check every image with CRI again on the next pass (the kubelet may remove some)."""
        self.pulled.clear()

    async def pull_ready(self, images: Iterable[str], held: frozenset[Digest],
                         caches: Mapping[str, Sequence[str]] | None = None,
                         every: Sequence[str] = (),
                         layers: Mapping[str, tuple[Digest, ...]] | None = None) -> None:
        """Pull each of ``images`` whose layers are all present; ``held``: known present.

        ``caches`` names the caches wanting each image (their credentials are used);
        an image missing there uses those of ``every`` cache on the node. ``layers`` gives
        an image's layers as the operator resolved them; one missing there is resolved.
        """
        wanting = caches or {}
        given = layers or {}
        for image in images:
            key = f"image {image}"
            now = asyncio.get_running_loop().time()
            if image in self.pulled or not self.retry.ready(key, now):
                continue
            try:
                if await self._pull_if_ready(image, held, wanting.get(image) or every,
                                             given.get(image)):
                    self.pulled.add(image)
                    self.retry.succeeded(key)
                    self.book.failing.pop(key, None)
                    self.book.touch()
            except Exception as error:
                self._layers.pop(image, None)  # resolve again, with fresh credentials
                reason = (Reason.IMAGE_PULL_FAILED if isinstance(error, ContainerdError)
                          else Reason.IMAGE_RESOLVE_FAILED)
                self.book.failing[key] = self.book.error(reason, f"{image}: {error}")
                self.retry.failed(key, asyncio.get_running_loop().time())

    async def _pull_if_ready(self, image: str, held: frozenset[Digest],
                             caches: Sequence[str], given: tuple[Digest, ...] | None) -> bool:
        if await self.cri.status(image) is not None:
            return True
        reference = parse_reference(image)
        known = self._layers.get(image)
        if known is None:
            # Foreign layers are never held: containerd's pull fetches them from their urls.
            async def resolve_one() -> tuple[tuple[Digest, ...], Keyring]:
                if given is not None:  # the operator resolved it: only ask who may read it
                    if await head_manifest(self.registry, reference) is None:
                        await get_manifest(self.registry, reference)
                    return given, current_keyring() or Keyring()
                resolved = await resolve(self.registry, image, self.platform())
                return (tuple(layer.digest for layer in resolved.distributable),
                        current_keyring() or Keyring())
            # The credentials the registry accepted here are the CRI pull's.
            known = self._layers[image] = await first_accepted(
                self.keyrings(caches, reference.registry), resolve_one)
        layers, keyring = known
        for digest in layers:
            if digest not in held and await self.store.info(digest) is None:
                return False
        credentials = keyring.credentials_for(reference.registry)
        auth = (AuthConfig(username=credentials.username, password=credentials.password,
                           server_address=reference.registry) if credentials else None)
        image_ref = await self.cri.pull(image, auth)
        log.info("image %s pulled", image, extra={"image_id": image_ref})
        return True
