"""Kubernetes status conditions, built one way for LayerCache and NodeLayerCache.

API conventions (sig-architecture api-conventions.md, "Typical status properties"): a
condition has `type`, `status` ("True" | "False" | "Unknown"), a CamelCase `reason`, a
human `message`, `observedGeneration`, and `lastTransitionTime`, which changes only when
`status` does — so a status rewritten with the same verdict does not look like news.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["MAX_MESSAGE", "condition", "headline_reason", "now_iso"]

#: Longest condition message kept (the CRDs' maxLength).
MAX_MESSAGE = 2048


def now_iso() -> str:
    """The current time as RFC 3339 UTC with seconds, as Kubernetes writes it."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(previous: Mapping[str, Mapping[str, Any]], kind: str, status: str | bool,
              reason: str, message: str, generation: int | None,
              now: str | None = None) -> dict[str, Any]:
    """Condition `kind`; `previous` maps type → the condition written before.

    `status` is "True"/"False"/"Unknown" or a bool; `message` is cut to `MAX_MESSAGE`.
    """
    text = status if isinstance(status, str) else ("True" if status else "False")
    old = previous.get(kind) or {}
    since = old.get("lastTransitionTime") if old.get("status") == text else None
    return {"type": kind, "status": text, "reason": reason, "message": message[:MAX_MESSAGE],
            "lastTransitionTime": since or now or now_iso(), "observedGeneration": generation}


def headline_reason(conditions: Iterable[Mapping[str, Any]]) -> str:
    """The one reason to read first: Degraded's when it is True, else Ready's ("-": none).

    What ``kubectl get lc`` shows in its Reason column (``status.reason``) and
    ``layercache status`` in its REASON column.
    """
    by_type = {c.get("type", ""): c for c in conditions}
    degraded = by_type.get("Degraded") or {}
    if degraded.get("status") == "True":
        return str(degraded.get("reason", "Degraded"))
    return str((by_type.get("Ready") or {}).get("reason", "-"))
