"""`LayerCache.spec` parsed at the edge into a typed, validated model.

The CRD's OpenAPI schema rejects what it can (types, enums, patterns, ranges); this module
checks the rest (reference grammar, platforms, quantities, durations) and turns the raw
dict kopf hands us into `CacheSpec`. Every error names the object and the field, e.g.
``LayerCache team-a/warm: spec.images[2]: repository path must be lower-case``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kubernetes.utils import parse_quantity

from layercache.api.warm import WARMING_TAINT
from layercache.oci.platform import InvalidPlatformError, Platform, parse_platform
from layercache.oci.reference import InvalidReferenceError, Reference, parse_reference

__all__ = ["CacheSpec", "InvalidSpecError", "LabelSelector", "Toleration", "parse_duration",
           "parse_spec"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|m|s)")
#: A label key: an optional DNS-subdomain prefix and "/", then a name (k8s.io/apimachinery
#: validation: IsQualifiedName); a label value (IsValidLabelValue), possibly empty.
_LABEL_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_LABEL_KEY = re.compile(rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(rf"{_LABEL_NAME}?")
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


class InvalidSpecError(ValueError):
    """A LayerCache spec field is invalid; the message names object and field."""

    def __init__(self, obj: str, field_path: str, problem: str) -> None:
        super().__init__(f"LayerCache {obj}: spec.{field_path}: {problem}")
        self.field_path = field_path


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration of h/m/s parts (``10m``, ``1h30m``, ``90s``).

    Raises:
        ValueError: anything else (including an empty string or a zero duration).
    """
    if not text or _DURATION.sub("", text) != "":
        raise ValueError(f"{text!r} is not a duration like 30s, 10m or 1h30m")
    seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(text))
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return seconds


@dataclass(frozen=True)
class Toleration:
    """A toleration, with the scheduler's matching rules (k8s.io/api core/v1 toleration.go)."""

    key: str = ""
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str = ""
    effect: str = ""

    def tolerates(self, taint: Mapping[str, Any]) -> bool:
        """Whether this toleration matches `taint` (a Node `spec.taints[]` entry)."""
        if self.effect and self.effect != taint.get("effect"):
            return False
        if not self.key:  # an empty key with Exists tolerates every taint
            return self.operator == "Exists"
        if self.key != taint.get("key"):
            return False
        return self.operator == "Exists" or self.value == (taint.get("value") or "")


@dataclass(frozen=True)
class LabelSelector:
    """A metav1.LabelSelector: ``matchLabels`` and ``matchExpressions``, all ANDed.

    ``expressions`` holds (key, operator, values) with operator In, NotIn, Exists or
    DoesNotExist. An empty selector selects everything, as in the Kubernetes API.
    """

    match_labels: Mapping[str, str] = field(default_factory=dict)
    expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def query(self) -> str:
        """The selector in the API's ``labelSelector`` query syntax (``a=b,c in (d,e),!f``).

        The apiserver evaluates it with the full semantics (k8s.io/apimachinery labels).
        """
        terms = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for key, operator, values in self.expressions:
            joined = ",".join(values)
            terms.append({"In": f"{key} in ({joined})", "NotIn": f"{key} notin ({joined})",
                          "Exists": key, "DoesNotExist": f"!{key}"}[operator])
        return ",".join(terms)


def parse_label_selector(obj: str, path: str, raw: object) -> LabelSelector:
    """Validate a metav1.LabelSelector dict (``matchLabels``, ``matchExpressions``).

    ``path`` is the field's path for messages (``imagesFrom.podSelector``). The rules are
    the apiserver's (ValidateLabelSelector): In/NotIn need values, Exists/DoesNotExist
    take none; keys and values have label syntax.

    Raises:
        InvalidSpecError: names the offending field.
    """
    if not isinstance(raw, Mapping):
        raise InvalidSpecError(obj, path, "must be an object (matchLabels, matchExpressions)")
    unknown = sorted(set(raw) - {"matchLabels", "matchExpressions"})
    if unknown:
        raise InvalidSpecError(obj, f"{path}.{unknown[0]}",
                               "unknown field; a label selector has matchLabels and "
                               "matchExpressions")
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, Mapping):
        raise InvalidSpecError(obj, f"{path}.matchLabels", "must be an object of strings")
    for key, value in labels.items():
        _check_label(obj, f"{path}.matchLabels[{key!r}]", str(key), value)
    expressions = []
    for i, item in enumerate(raw.get("matchExpressions") or []):
        where = f"{path}.matchExpressions[{i}]"
        if not isinstance(item, Mapping):
            raise InvalidSpecError(obj, where, "must be an object (key, operator, values)")
        key, operator, values = item.get("key"), item.get("operator"), item.get("values")
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise InvalidSpecError(obj, f"{where}.key", f"{key!r} is not a label key")
        if operator not in _SELECTOR_OPERATORS:
            raise InvalidSpecError(obj, f"{where}.operator",
                                   f"{operator!r} must be one of {', '.join(_SELECTOR_OPERATORS)}")
        values = list(values or [])
        if operator in ("In", "NotIn") and not values:
            raise InvalidSpecError(obj, f"{where}.values", f"{operator} needs at least one value")
        if operator in ("Exists", "DoesNotExist") and values:
            raise InvalidSpecError(obj, f"{where}.values", f"{operator} takes no values")
        for j, value in enumerate(values):
            _check_label(obj, f"{where}.values[{j}]", key, value)
        expressions.append((key, str(operator), tuple(str(v) for v in values)))
    return LabelSelector({str(k): str(v) for k, v in labels.items()}, tuple(expressions))


def _check_label(obj: str, where: str, key: str, value: object) -> None:
    if not _LABEL_KEY.fullmatch(key):
        raise InvalidSpecError(obj, where, f"{key!r} is not a label key")
    if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
        raise InvalidSpecError(obj, where, f"{value!r} is not a label value")


@dataclass(frozen=True)
class CacheSpec:
    """A validated LayerCache spec. Sizes in bytes, durations in seconds."""

    images: tuple[Reference, ...] = ()
    images_from_namespaces: tuple[str, ...] = ()
    images_from_selector: LabelSelector | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    platforms: tuple[Platform, ...] = ()
    pull_secrets: tuple[str, ...] = ()
    mode: Literal["Layers", "Images"] = "Layers"
    min_shared_by: int = 1
    max_bytes_per_node: int | None = None
    refresh_seconds: float = 600.0
    paused: bool = False

    def targets(self, labels: Mapping[str, str], taints: list[Mapping[str, Any]]) -> bool:
        """Whether a node with `labels` and `taints` should hold this cache.

        All of `node_selector` must match, and every NoSchedule/NoExecute taint must be
        tolerated — the scheduler's rule for whether a Pod may land there — except the
        startup taint `layercache.api.warm.WARMING_TAINT`, there until the node is warm.
        """
        if any(labels.get(k) != v for k, v in self.node_selector.items()):
            return False
        # The startup taint waits for us to warm the node: it must not keep us away.
        return all(any(t.tolerates(taint) for t in self.tolerations) for taint in taints
                   if taint.get("effect") in ("NoSchedule", "NoExecute")
                   and taint.get("key") != WARMING_TAINT)


def parse_spec(obj: str, raw: Mapping[str, Any]) -> CacheSpec:
    """Validate a LayerCache's `spec` dict (`obj` = "namespace/name", for messages).

    Raises:
        InvalidSpecError: the first invalid field, named with its path.
    """
    images = []
    for i, text in enumerate(raw.get("images") or []):
        try:
            images.append(parse_reference(text))
        except InvalidReferenceError as e:
            raise InvalidSpecError(obj, f"images[{i}]", str(e)) from None
    images_from = raw.get("imagesFrom")
    if not images and images_from is None:
        raise InvalidSpecError(obj, "images", "set images, imagesFrom, or both")
    platforms = []
    for i, text in enumerate(raw.get("platforms") or []):
        try:
            platforms.append(parse_platform(text))
        except InvalidPlatformError as e:
            raise InvalidSpecError(obj, f"platforms[{i}]", str(e)) from None
    budget = raw.get("maxBytesPerNode")
    try:
        max_bytes = None if budget is None else int(parse_quantity(budget))  # type: ignore[no-untyped-call]
    except ValueError as e:
        raise InvalidSpecError(obj, "maxBytesPerNode", f"{budget!r} is not a quantity: {e}"
                               ) from None
    try:
        refresh = parse_duration(raw.get("refreshInterval") or "10m")
    except ValueError as e:
        raise InvalidSpecError(obj, "refreshInterval", str(e)) from None
    min_shared = raw.get("minSharedBy", 1)
    if not isinstance(min_shared, int) or min_shared < 1:
        raise InvalidSpecError(obj, "minSharedBy", f"{min_shared!r} must be an integer >= 1")
    mode = raw.get("mode", "Layers")
    if mode not in ("Layers", "Images"):
        raise InvalidSpecError(obj, "mode", f"{mode!r} must be Layers or Images")
    tolerations = []
    for i, t in enumerate(raw.get("tolerations") or []):
        operator = t.get("operator") or "Equal"
        if operator == "Exists":
            op: Literal["Exists", "Equal"] = "Exists"
        elif operator == "Equal":
            op = "Equal"
        else:
            raise InvalidSpecError(obj, f"tolerations[{i}].operator",
                                   f"{operator!r} must be Exists or Equal")
        tolerations.append(Toleration(t.get("key") or "", op, t.get("value") or "",
                                      t.get("effect") or ""))
    selector = None
    if images_from is not None:
        selector = parse_label_selector(obj, "imagesFrom.podSelector",
                                        images_from.get("podSelector") or {})
    return CacheSpec(
        images=tuple(images),
        images_from_namespaces=tuple((images_from or {}).get("namespaces") or ()),
        images_from_selector=selector,
        node_selector=dict(raw.get("nodeSelector") or {}),
        tolerations=tuple(tolerations),
        platforms=tuple(platforms),
        pull_secrets=tuple(s["name"] for s in raw.get("pullSecrets") or []),
        mode=mode,
        min_shared_by=min_shared,
        max_bytes_per_node=max_bytes,
        refresh_seconds=refresh,
        paused=bool(raw.get("paused", False)),
    )
