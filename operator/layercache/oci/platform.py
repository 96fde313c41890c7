"""Platforms (os/architecture/variant) and choosing a manifest from an image index.

Mirrors containerd's ``platforms`` package (github.com/containerd/platforms:
``database.go`` normalisation, ``compare.go`` ``Only`` ordering) so that we pre-warm the
manifest the kubelet's pull through containerd will choose, not a near miss:

- normalisation: ``x86_64``/``x86-64`` → ``amd64`` (variant ``v1`` dropped), ``aarch64`` →
  ``arm64`` (variant ``v8``/``8``/``v8.0`` dropped: v8 is arm64's default; ``9``/``v9.0`` →
  ``v9``), ``armhf`` → ``arm/v7``,
  ``armel`` → ``arm/v6``, ``arm`` without variant → ``arm/v7``, ``i386`` → ``386``,
  ``macos`` → ``darwin``; everything lower-cased;
- compatibility order: the platform itself, then older variants (``amd64/v3`` → v2, v1;
  ``arm/v7`` → v6, v5; ``arm64`` → ``arm/v8`` … ``arm/v5``), and ``amd64`` also runs ``386``.

Linux-only simplification: ``os.version`` is ignored (containerd uses it for Windows only),
and an index entry that declares ``os.features`` is not matched, as containerd does for a
host that declares none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "ATTESTATION_ANNOTATION",
    "InvalidPlatformError",
    "Platform",
    "PlatformNotFoundError",
    "is_attestation",
    "parse_platform",
    "select_manifest",
]

#: BuildKit marks provenance/SBOM manifests in an index with this annotation.
ATTESTATION_ANNOTATION: Final = "vnd.docker.reference.type"
_ATTESTATION_VALUE: Final = "attestation-manifest"
_COMPONENT: Final = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)
_VERSION: Final = re.compile(r"v(\d+)", re.ASCII)


class InvalidPlatformError(ValueError):
    """A platform string or object is malformed; the message names it and the part."""


class PlatformNotFoundError(LookupError):
    """No entry of an index runs on the wanted platform.

    ``wanted`` is the platform asked for; ``offered`` the platforms the index does offer (in
    index order, attestation entries left out); ``attestations`` how many entries were skipped
    as attestations.
    """

    def __init__(self, wanted: Platform, offered: Sequence[str], attestations: int) -> None:
        listed = ", ".join(offered) if offered else "nothing runnable"
        note = f" ({attestations} attestation entries ignored)" if attestations else ""
        super().__init__(f"no manifest for {wanted} in the index; it offers: {listed}{note}")
        self.wanted = wanted
        self.offered = tuple(offered)
        self.attestations = attestations


def _normalise_arch(arch: str, variant: str) -> tuple[str, str]:
    # containerd database.go normalizeArch (current main), case for case.
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        if variant in ("8", "v8", "v8.0"):
            return "arm64", ""
        return "arm64", "v9" if variant in ("9", "9.0", "v9.0") else variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            return "arm", "v7"
        if variant in ("5", "6", "8"):
            return "arm", "v" + variant
    return arch, variant


@dataclass(frozen=True, slots=True)
class Platform:
    """An OCI platform, normalised on construction, so ``==`` is containerd's exact match.

    ``Platform("linux", "x86_64") == Platform("linux", "amd64")`` and
    ``Platform("linux", "arm64", "v8") == Platform("linux", "arm64")``.

    Raises:
        InvalidPlatformError: os or architecture empty, or a part holding characters outside
            ``[A-Za-z0-9_.-]`` (containerd's specifier alphabet).

    """

    os: str
    architecture: str
    variant: str = ""

    def __post_init__(self) -> None:
        for part, value in (("os", self.os), ("architecture", self.architecture)):
            if not isinstance(value, str) or not _COMPONENT.fullmatch(value):
                raise InvalidPlatformError(f"platform {part} {value!r} is empty or malformed")
        if not isinstance(self.variant, str) or (
            self.variant and not _COMPONENT.fullmatch(self.variant)
        ):
            raise InvalidPlatformError(f"platform variant {self.variant!r} is malformed")
        os_name = self.os.lower()
        arch, variant = _normalise_arch(self.architecture, self.variant)
        object.__setattr__(self, "os", "darwin" if os_name == "macos" else os_name)
        object.__setattr__(self, "architecture", arch)
        object.__setattr__(self, "variant", variant)

    def __str__(self) -> str:
        """``os/architecture[/variant]``, e.g. ``linux/arm/v7`` or ``linux/arm64``."""
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base

    @classmethod
    def from_oci(cls, obj: Mapping[str, Any]) -> Platform:
        """From a descriptor's ``platform`` JSON object (OCI image-index spec).

        Raises:
            InvalidPlatformError: ``os`` or ``architecture`` missing or malformed.

        """
        variant = obj.get("variant") or ""
        return cls(str(obj.get("os") or ""), str(obj.get("architecture") or ""), str(variant))

    def compatible(self) -> tuple[Platform, ...]:
        """Platforms this one runs, best first: containerd ``platforms.Only`` order."""
        return tuple(dict.fromkeys(_vector(self)))


def _older(os: str, arch: str, major: int, lowest: int) -> list[Platform]:
    return [Platform(os, arch, f"v{n}") for n in range(major - 1, lowest - 1, -1)]


def _vector(p: Platform) -> list[Platform]:
    # containerd compare.go platformVector, including its arm64 v8.x/v9.x arithmetic.
    vector = [p]
    version = _VERSION.fullmatch(p.variant)
    if p.architecture == "amd64":
        if version and int(version.group(1)) > 1:
            vector += _older(p.os, "amd64", int(version.group(1)), 1)
        vector.append(Platform(p.os, "386"))
    elif p.architecture == "arm":
        if version and int(version.group(1)) > 5:
            vector += _older(p.os, "arm", int(version.group(1)), 5)
    elif p.architecture == "arm64":
        variant = p.variant or "v8"
        major_text, dot, minor_text = variant.partition(".")
        major_match = _VERSION.fullmatch(major_text)
        if major_match and int(major_match.group(1)) >= 8:
            major = int(major_match.group(1))
            minor = int(minor_text) if dot and len(variant) == 4 and minor_text.isdigit() else 0
            if major == 9:
                vector += [_arm64(p.os, 9, m) for m in range(minor - 1, -1, -1)]
                # v9.0 diverged from v8.5: v9.x also runs v8.{x+5} and below.
                major, minor = 8, minor + 5
                vector.append(_arm64(p.os, 8, minor))
            vector += [_arm64(p.os, major, m) for m in range(minor - 1, -1, -1)]
        if variant.startswith(("v8.", "v9.")):
            variant = "v8"
        vector += _vector(Platform(p.os, "arm", variant))
    return vector


def _arm64(os: str, major: int, minor: int) -> Platform:
    return Platform(os, "arm64", f"v{major}" if minor == 0 else f"v{major}.{minor}")


def parse_platform(text: str) -> Platform:
    """Parse ``os/architecture[/variant]``, e.g. ``linux/amd64``, ``linux/arm/v7``.

    Unlike containerd we do not fill in the host's os or architecture: a node's platform is
    always stated in full.

    Raises:
        InvalidPlatformError: not two or three non-empty parts of ``[A-Za-z0-9_.-]``.

    """
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidPlatformError(
            f"platform {text!r} must be os/architecture[/variant], e.g. linux/amd64"
        )
    try:
        return Platform(*parts)
    except InvalidPlatformError as exc:
        raise InvalidPlatformError(f"platform {text!r}: {exc}") from exc


def is_attestation(entry: Mapping[str, Any]) -> bool:
    """Whether an index entry is an attestation (SBOM/provenance), never a runnable image.

    True for BuildKit's ``vnd.docker.reference.type: attestation-manifest`` annotation and
    for platform ``unknown/unknown``, which BuildKit also gives them.
    """
    annotations = entry.get("annotations") or {}
    if annotations.get(ATTESTATION_ANNOTATION) == _ATTESTATION_VALUE:
        return True
    platform = entry.get("platform") or {}
    return platform.get("os") == "unknown" and platform.get("architecture") == "unknown"


def select_manifest(entries: Sequence[Mapping[str, Any]], platform: Platform) -> Mapping[str, Any]:
    """Choose the index entry a node of ``platform`` would pull, as containerd does.

    ``entries`` are the ``manifests`` descriptors of an OCI image index / Docker manifest
    list as decoded JSON (``mediaType``, ``digest``, ``size``, ``platform``, ``annotations``).
    Returns the chosen entry itself. Best rank in `Platform.compatible` wins (an exact variant
    beats a compatible older one); among equals, the first in index order. Attestations,
    entries without a platform and entries declaring ``os.features`` are never chosen.

    Raises:
        PlatformNotFoundError: nothing runs on ``platform``; lists what the index offers.

    """
    ranks = {candidate: rank for rank, candidate in enumerate(platform.compatible())}
    best: Mapping[str, Any] | None = None
    best_rank = len(ranks)
    offered: list[str] = []
    attestations = 0
    for entry in entries:
        if is_attestation(entry):
            attestations += 1
            continue
        raw = entry.get("platform")
        if not raw:
            offered.append("(no platform)")
            continue
        try:
            candidate = Platform.from_oci(raw)
        except InvalidPlatformError:
            offered.append("(malformed platform)")
            continue
        offered.append(str(candidate) + ("+features" if raw.get("os.features") else ""))
        rank = ranks.get(candidate, best_rank)
        if rank < best_rank and not raw.get("os.features"):
            best, best_rank = entry, rank
    if best is None:
        raise PlatformNotFoundError(platform, offered, attestations)
    return best
