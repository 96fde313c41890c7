"""What the operator knows of one LayerCache between events: `CacheState`.

One `CacheState` per cache, held by the controller (layercache.controller.controller) in
its ``caches`` map. A resolution makes a new state (`CacheState.begin`, carrying over what
the previous one knew); the other parts change it only through its methods: the replanner
records what it planned (`record_plan`, `baseline_at`, `mark_planned`), the reporter what
it wrote and reported (`record_status`, `note_reported`). Reading is free.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from layercache.api import LC_KIND, InvalidObjectError, LayerCacheStatus
from layercache.api.spec import CacheSpec
from layercache.oci.digest import Digest
from layercache.oci.resolved import ResolvedImage
from layercache.plan.planner import Plan

__all__ = ["TRANSIENT_RETRY_SECONDS", "CacheState", "ImageError", "SecretRef"]

log = logging.getLogger(__name__)

#: Seconds before a cache whose resolution failed transiently is resolved again (at least:
#: a server's longer ``Retry-After`` pushes it back).
TRANSIENT_RETRY_SECONDS = 30.0
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
    """What the operator knows of one LayerCache between handler calls.

    Times: ``resolved_at`` is the controller's clock (monotonic seconds), ``resolved_time``
    the RFC 3339 time written to status.
    """

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

    @classmethod
    def begin(cls, namespace: str, name: str, generation: int, raw_spec: Mapping[str, Any],
              uid: str = "", before: CacheState | None = None,
              stored_status: Mapping[str, Any] | None = None) -> CacheState:
        """A new resolution's state, knowing what ``before`` (or else the stored status) knew.

        From ``before``: the status written, the nodes, byte baselines and carried bytes,
        the foreign layers reported. Without it (an operator restart), ``stored_status``
        (the object's status) seeds the status, the carried bytes and the foreign layers
        reported, so nothing flaps or restarts at 0; an unreadable one is logged and only
        the counters start over.
        """
        state = cls(namespace, name, generation, raw_spec=dict(raw_spec), uid=uid)
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
        return state

    @property
    def key(self) -> str:
        """"namespace/name"."""
        return f"{self.namespace}/{self.name}"

    def digests(self) -> dict[tuple[str, str], Digest]:
        """(reference, platform) → resolved digest, to notice a moved tag."""
        return {(str(r.reference), str(r.platform)): r.digest for r in self.resolved}

    # -- resolution ------------------------------------------------------------------
    def accept_spec(self, spec: CacheSpec) -> None:
        """The parsed spec."""
        self.spec = spec

    def reject(self, message: str) -> None:
        """The cache cannot be planned: ``message`` names the field (spec, plan input)."""
        self.invalid = message

    def add_errors(self, errors: Iterable[ImageError]) -> None:
        """Images (or pull Secrets) that failed, in the order found."""
        self.errors += errors

    def use_configs(self, docker_configs: list[str]) -> None:
        """The Docker configs (JSON text) this cache may use, in the order they are tried."""
        self.docker_configs = docker_configs

    def note_transient(self, retry_after: float | None) -> None:
        """A transient failure: resolve again soon (not before ``retry_after`` seconds)."""
        self.retry_transient = True
        self.retry_after = max(self.retry_after, retry_after or 0.0)

    def finish(self, resolved: list[ResolvedImage], at: float, time: str) -> None:
        """The images resolved, at monotonic ``at`` seconds (``time``: RFC 3339)."""
        self.resolved = resolved
        self.resolved_at, self.resolved_time = at, time

    def due_for_refresh(self, now: float) -> bool:
        """Whether the tags should be resolved again at monotonic ``now`` seconds.

        After ``refreshInterval``; sooner (`TRANSIENT_RETRY_SECONDS`, or a longer
        ``Retry-After``) after a transient failure. Never for an invalid or paused spec.
        """
        if self.spec is None or self.spec.paused:
            return False
        # Transient failures (connection, 5xx, 429) may succeed soon, bad input will not; a
        # server that said when to come back (Retry-After) is not asked before.
        wait = (max(TRANSIENT_RETRY_SECONDS, self.retry_after) if self.retry_transient
                else self.spec.refresh_seconds)
        return now - self.resolved_at >= wait

    # -- planning --------------------------------------------------------------------
    def record_plan(self, desired_nodes: tuple[str, ...], plan: Plan | None) -> None:
        """The nodes the cache targets now and its plan over them (None: not plannable)."""
        self.desired_nodes, self.plan = desired_nodes, plan

    def baseline_at(self, node: str, counters: tuple[int, int]) -> None:
        """Node ``node``'s (upstream, peer) counters before this cache first planned there."""
        self.baseline.setdefault(node, counters)

    def mark_planned(self) -> None:
        """Node specs reflect this resolution now."""
        self.planned = True

    # -- reporting -------------------------------------------------------------------
    def record_status(self, status: dict[str, Any] | None) -> None:
        """The status last written (or, after a refresh, the one the previous state wrote)."""
        self.last_status = status

    def note_reported(self, foreign: Iterable[str]) -> None:
        """Foreign layers (digests) an Event has reported."""
        self.reported_foreign = self.reported_foreign | frozenset(foreign)
