"""Start-up cleanup: our leases and ingests that no longer serve a wanted layer.

A killed agent leaves behind what its writes held: the ingest of each blob it was writing
and that ingest's lease (`layercache.containerd.ingest.ingest_lease_id`). Ingests of
layers still wanted are kept, with their leases, so the next write resumes from their
offset; every other ingest of ours (ref ``layercache-…``) is aborted and every other lease
labelled ``layercache.dev/managed-by=layercache`` deleted. The leases' own
``containerd.io/gc.expire`` is the backstop when the agent never comes back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from layercache.containerd.content import ingest_ref
from layercache.containerd.ingest import ingest_lease_id
from layercache.containerd.labels import MANAGED_BY, MANAGED_BY_LABEL
from layercache.containerd.ports import ContentStorePort
from layercache.oci.digest import Digest

__all__ = ["Cleanup", "clean_stale"]

log = logging.getLogger(__name__)

#: Prefix of our ingest refs (`layercache.containerd.content.ingest_ref`).
REF_PREFIX = "layercache-"
#: containerd filter selecting the leases we created.
LEASE_FILTER = f'labels."{MANAGED_BY_LABEL}"=={MANAGED_BY}'


@dataclass(frozen=True)
class Cleanup:
    """What `clean_stale` did: ingest refs ``kept`` and ``aborted``, lease ids ``deleted``."""

    kept: tuple[str, ...]
    aborted: tuple[str, ...]
    deleted: tuple[str, ...]


async def clean_stale(store: ContentStorePort, wanted: Iterable[Digest]) -> Cleanup:
    """Abort our ingests and delete our leases that no wanted layer needs.

    Raises:
        ContainerdError: containerd could not be asked (the agent retries its start).

    """
    resumable = {ingest_ref(digest) for digest in wanted}
    ours = [s.ref for s in await store.list_statuses() if s.ref.startswith(REF_PREFIX)]
    kept = tuple(ref for ref in ours if ref in resumable)
    aborted = tuple(ref for ref in ours if ref not in resumable)
    for ref in aborted:
        await store.abort(ref)
    keep_leases = {ingest_lease_id(ref) for ref in kept}
    deleted = tuple(lease.id for lease in await store.leases.list([LEASE_FILTER])
                    if lease.id not in keep_leases)
    for lease_id in deleted:
        await store.leases.delete(lease_id, missing_ok=True)
    log.info("start-up cleanup: %d ingests kept to resume, %d aborted, %d leases deleted",
             len(kept), len(aborted), len(deleted),
             extra={"kept": list(kept), "aborted": list(aborted), "deleted": list(deleted)})
    return Cleanup(kept, aborted, deleted)
