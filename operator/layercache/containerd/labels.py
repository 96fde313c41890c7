"""The labels that keep our blobs through containerd's garbage collection, and say whose they are.

containerd's GC (``metadata/gc.go``) keeps what is reachable from its roots: images, leases,
and objects labelled ``containerd.io/gc.root``. A blob we write is held by a lease only while
the write runs; the ``gc.root`` label keeps it after, until we remove the label. Next to it
we put our own labels: ``layercache.dev/managed-by=layercache`` (what we may unpin) and one
``layercache.dev/cache.<cache>`` per cache that wants the blob (what keeps it pinned), so
the pin can be dropped when the last cache lets go.

Label values must be non-empty: containerd drops a label whose value is empty. A key and
its value may not exceed 4096 bytes together.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = [
    "CACHE_LABEL_PREFIX",
    "GC_ROOT_LABEL",
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "MANAGED_FILTER",
    "cache_label",
    "caches_of",
    "is_managed",
    "pin_labels",
    "unpin_keys",
]

#: containerd GC root label: the labelled object is kept whatever references it.
GC_ROOT_LABEL: Final = "containerd.io/gc.root"
#: Our ownership label and its value.
MANAGED_BY_LABEL: Final = "layercache.dev/managed-by"
MANAGED_BY: Final = "layercache"
#: Prefix of the per-cache labels: ``layercache.dev/cache.<cache>``.
CACHE_LABEL_PREFIX: Final = "layercache.dev/cache."
#: containerd filter (``Content.List``) selecting the blobs we manage.
MANAGED_FILTER: Final = f'labels."{MANAGED_BY_LABEL}"=={MANAGED_BY}'


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cache_label(cache: str) -> str:
    """The label key saying that ``cache`` (e.g. ``namespace/name``) wants a blob.

    Raises:
        ValueError: ``cache`` is empty.

    """
    if not cache:
        raise ValueError("a cache name must not be empty")
    return CACHE_LABEL_PREFIX + cache


def pin_labels(caches: Iterable[str]) -> dict[str, str]:
    """Labels that pin a blob for ``caches``: ``gc.root``, managed-by and one per cache.

    Values of ``gc.root`` and the cache labels are the current time (RFC 3339, UTC), which
    says when the blob was last pinned; containerd only needs them non-empty.
    """
    now = _now()
    labels = {GC_ROOT_LABEL: now, MANAGED_BY_LABEL: MANAGED_BY}
    labels.update({cache_label(cache): now for cache in caches})
    return labels


def is_managed(labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` carry our managed-by label."""
    return labels.get(MANAGED_BY_LABEL) == MANAGED_BY


def caches_of(labels: Mapping[str, str]) -> frozenset[str]:
    """The caches that want a blob, from its labels."""
    return frozenset(k.removeprefix(CACHE_LABEL_PREFIX) for k in labels
                     if k.startswith(CACHE_LABEL_PREFIX))


def unpin_keys(labels: Mapping[str, str], caches: Iterable[str] | None) -> list[str]:
    """The label keys to remove from a blob labelled ``labels`` when ``caches`` let go of it.

    ``caches`` None means every cache. The cache labels of ``caches`` go; when no cache
    label remains and the blob is ours (`is_managed`), ``gc.root`` and managed-by go too,
    leaving the blob to containerd's GC unless an image or a lease still references it. A
    ``gc.root`` we did not set (no managed-by label) is never removed.
    """
    held = caches_of(labels)
    leaving = held if caches is None else held & set(caches)
    keys = [cache_label(cache) for cache in sorted(leaving)]
    if not held - leaving and is_managed(labels):
        keys += [k for k in (GC_ROOT_LABEL, MANAGED_BY_LABEL) if k in labels]
    return keys
