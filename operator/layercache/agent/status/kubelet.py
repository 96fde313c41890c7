"""The kubelet's disk thresholds on this node, read from its configuration file.

The kubelet evicts Pods when the image filesystem's free space falls under its hard
eviction threshold ``imagefs.available`` (default 15 %), or ``nodefs.available`` (10 %) on
the node filesystem, which on most nodes (kind, kubeadm) is the same filesystem; a soft
threshold evicts too, after its grace period. Its image garbage collection deletes unused
images once use passes ``imageGCHighThresholdPercent`` (85 %). The agent's disk guard
(`layercache.agent.status.disk`) keeps its fetches clear of all of them, with a `MARGIN_PERCENT`
on top for what Pods and the kubelet write between two checks, so layercache never causes
an eviction or an image GC.

The file is the kubelet's ``--config``, a ``KubeletConfiguration``
(``kubelet.config.k8s.io/v1beta1``, YAML or JSON): kind and kubeadm write
``/var/lib/kubelet/config.yaml``, which the agent's DaemonSet mounts read-only. Fields
read: ``evictionHard``, ``evictionSoft`` (signal → ``"15%"`` or a quantity such as
``"10Gi"``), ``mergeDefaultEvictionSettings`` and ``imageGCHighThresholdPercent``. As in the
kubelet, the default hard thresholds apply only when ``evictionHard`` is not set at all (or
``mergeDefaultEvictionSettings`` is true); a ``0%`` threshold is none. A missing or empty
file means the kubelet's defaults; an unreadable or malformed one means the defaults too,
with a warning (never a lower floor than the defaults would give).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final

import yaml

__all__ = ["MARGIN_PERCENT", "DiskThreshold", "KubeletDisk", "read_kubelet_disk"]

log = logging.getLogger(__name__)

#: Points of the filesystem kept free above the kubelet's highest disk threshold.
MARGIN_PERCENT: Final = 5.0
#: The eviction signals about free bytes of the filesystems that hold images.
DISK_SIGNALS: Final = ("imagefs.available", "nodefs.available")
#: The kubelet's default hard eviction thresholds for those signals (Linux).
DEFAULT_EVICTION_HARD: Final[Mapping[str, str]] = {
    "imagefs.available": "15%", "nodefs.available": "10%"}
#: The kubelet's default ``imageGCHighThresholdPercent``.
DEFAULT_IMAGE_GC_HIGH: Final = 85

_SUFFIXES: Final[Mapping[str, int]] = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_QUANTITY: Final = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([a-zA-Z]*)")


@dataclass(frozen=True)
class DiskThreshold:
    """One kubelet threshold on free space: ``percent`` of the filesystem, or ``size`` bytes.

    ``what`` names it for messages, e.g. ``evictionHard imagefs.available=15%``.
    """

    what: str
    percent: float | None = None
    size: int | None = None

    def free_bytes(self, total: int) -> int:
        """The free bytes under which the kubelet acts, on a filesystem of ``total`` bytes."""
        if self.percent is not None:
            return int(total * self.percent / 100)
        return self.size or 0


@dataclass(frozen=True)
class KubeletDisk:
    """The kubelet's thresholds that concern the image filesystem; ``source`` says whence."""

    thresholds: tuple[DiskThreshold, ...]
    source: str

    def floor(self, total: int) -> tuple[int, str]:
        """Free bytes to keep on a filesystem of ``total`` bytes, and why (for messages).

        The highest threshold plus `MARGIN_PERCENT` of ``total``.
        """
        margin = int(total * MARGIN_PERCENT / 100)
        if not self.thresholds:
            return margin, f"{MARGIN_PERCENT:g} % margin ({self.source}: no disk thresholds)"
        top = max(self.thresholds, key=lambda t: t.free_bytes(total))
        return (top.free_bytes(total) + margin,
                f"the kubelet's {top.what} ({self.source}) + {MARGIN_PERCENT:g} % margin")


def parse_threshold(what: str, value: object) -> DiskThreshold | None:
    """A threshold from ``"15%"`` or a quantity (``"10Gi"``, ``"500M"``); None for 0.

    Raises:
        ValueError: not a percentage 0-100 nor a Kubernetes quantity (names ``what``).

    """
    text = str(value).strip()
    try:
        if text.endswith("%"):
            percent = float(Decimal(text[:-1]))
            if not 0 <= percent <= 100:
                raise ValueError("outside 0-100 %")
            return DiskThreshold(f"{what}={text}", percent=percent) if percent else None
        match = _QUANTITY.fullmatch(text)
        if match is None or match.group(2) not in _SUFFIXES:
            raise ValueError("not a percentage or a quantity such as 10Gi")
        size = int(Decimal(match.group(1)) * _SUFFIXES[match.group(2)])
    except (InvalidOperation, ValueError) as error:
        raise ValueError(f"{what}: {text!r}: {error}") from None
    return DiskThreshold(f"{what}={text}", size=size) if size else None


def kubelet_disk(config: Mapping[str, Any], source: str) -> KubeletDisk:
    """The disk thresholds of a parsed ``KubeletConfiguration`` (module docstring: rules).

    Raises:
        ValueError: a field has the wrong type or a threshold cannot be parsed.

    """
    thresholds: list[DiskThreshold] = []
    hard = config.get("evictionHard")
    if hard is None or config.get("mergeDefaultEvictionSettings") is True:
        hard = {**DEFAULT_EVICTION_HARD, **(hard or {})}
    for field, values in (("evictionHard", hard), ("evictionSoft", config.get("evictionSoft"))):
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ValueError(f"{field}: not a map of signal to threshold")
        for signal in DISK_SIGNALS:
            if signal in values:
                found = parse_threshold(f"{field} {signal}", values[signal])
                if found is not None:
                    thresholds.append(found)
    high = config.get("imageGCHighThresholdPercent", DEFAULT_IMAGE_GC_HIGH)
    if not isinstance(high, int) or isinstance(high, bool) or not 0 <= high <= 100:
        raise ValueError(f"imageGCHighThresholdPercent: {high!r} is not 0-100")
    if high < 100:
        thresholds.append(DiskThreshold(f"imageGCHighThresholdPercent={high}",
                                        percent=100.0 - high))
    return KubeletDisk(tuple(thresholds), source)


def defaults(source: str) -> KubeletDisk:
    """The kubelet's default thresholds (no configuration read)."""
    return kubelet_disk({}, source)


def read_kubelet_disk(path: Path | None) -> KubeletDisk:
    """The thresholds in the kubelet configuration file ``path`` (None: the defaults).

    Never raises: a missing or empty file gives the kubelet's defaults, an unreadable or
    malformed one the defaults and a warning.
    """
    if path is None:
        return defaults("kubelet defaults")
    try:
        text = path.read_text()
    except FileNotFoundError:
        log.info("no kubelet configuration at %s: assuming the kubelet's defaults", path)
        return defaults(f"kubelet defaults ({path} absent)")
    except OSError as error:
        log.warning("cannot read the kubelet configuration %s (%s): assuming the "
                    "kubelet's defaults", path, error)
        return defaults(f"kubelet defaults ({path} unreadable)")
    try:
        loaded = yaml.safe_load(text) if text.strip() else {}
        if not isinstance(loaded, Mapping):
            raise ValueError("not a KubeletConfiguration object")
        found = kubelet_disk(loaded, str(path))
    except (yaml.YAMLError, ValueError) as error:
        log.warning("kubelet configuration %s: %s: assuming the kubelet's defaults",
                    path, error)
        return defaults(f"kubelet defaults ({path} malformed)")
    return found
