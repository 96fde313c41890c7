"""The agent's status: what it counts and finds, as the NodeLayerCache ``status`` it patches.

`StatusBook` keeps the facts (inventory counts, byte counters, recent errors, disk
pressure) and renders the ``status`` object of the CRD: ``peerEndpoint``, ``layers``,
``chains`` (wanted, unpacked, bytes extracted; Ready waits for the chains as for the
blobs, except where the snapshotter is unsupported: then none can be unpacked and status
says so in Degraded),
``missing``, ``bytes``, ``disk`` (`layercache.agent.status.disksavings`), ``errors`` (≤ 20,
newest first), ``diskPressure``, conditions
``Ready``/``Progressing``/``Degraded`` (CamelCase reasons, ``lastTransitionTime`` kept while
a condition's status holds), ``observedGeneration`` and ``lastSync``. `StatusReporter`
patches it at most once per interval while things change, and at once on `flush`.

Byte counters are monotonic and persisted: the agent starts them from what the status held
(`layercache.agent.nodespec.Counters`), so a restart continues them. Error messages are
scrubbed of every secret value the agent holds and cut to the CRD's 512 characters.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kubernetes.client.exceptions import ApiException

from layercache.agent.nodespec import Counters
from layercache.agent.status.disksavings import NodeDisk
from layercache.api import Condition, NodeLayerCacheStatus, Reason
from layercache.api.conditions import condition, now_iso
from layercache.api.nodelayercache import (
    ByteCounters,
    ChainCounts,
    HumanBytes,
    LayerCounts,
    NodeError,
)
from layercache.metrics import AgentMetrics, FetchSource
from layercache.redact import redact
from layercache.units import human_bytes

__all__ = ["ErrorEntry", "StatusBook", "StatusReporter"]

log = logging.getLogger(__name__)

MAX_ERRORS: Final = 20
#: Seconds after which an unchanged status is written anyway, as a sign of life.
HEARTBEAT_SECONDS: Final = 300.0
MAX_ERROR_MESSAGE: Final = 512


@dataclass(frozen=True)
class ErrorEntry:
    """One failure as status lists it; ``digest`` None for failures not about one layer."""

    reason: str
    message: str
    digest: str | None = None

    def to_model(self) -> NodeError:
        """The ``status.errors[]`` item (``digest`` left out when None)."""
        if self.digest is None:
            return NodeError(reason=self.reason, message=self.message)
        return NodeError(reason=self.reason, message=self.message, digest=self.digest)

    def to_status(self) -> dict[str, str]:
        """The ``status.errors[]`` item as the CRD's dict."""
        return self.to_model().to_dict()


class StatusBook:
    """What the agent knows about its node, kept current by the reconciler.

    ``secrets`` gives the values to scrub from messages; ``metrics`` counts bytes and errors
    as they are recorded here, so status and metrics never disagree.
    """

    def __init__(self, counters: Counters, metrics: AgentMetrics,
                 secrets: Callable[[], Sequence[str]]) -> None:
        self.upstream = counters.upstream
        self.peer = counters.peer
        self.served = counters.served_to_peers
        self.metrics = metrics
        self.secrets = secrets
        self.errors: deque[ErrorEntry] = deque(maxlen=MAX_ERRORS)
        self.peer_endpoint: str | None = None
        self.generation = 0
        self.paused = False
        self.wanted = 0
        self.held = 0
        self.bytes_held = 0
        self.chains_wanted = 0
        self.chains_unpacked = 0
        self.bytes_unpacked = 0
        #: Chains still to unpack that Ready waits for (0 when unpacking is unsupported).
        self.chains_pending = 0
        self.missing: list[str] = []
        self.images_pending = 0
        self.disk: NodeDisk | None = None  # None until measured
        self.busy = False
        self.pressure: tuple[str, str] | None = None  # (reason, message) while refused
        self.failing: dict[str, ErrorEntry] = {}  # digest (or "") → its latest failure
        self.problems: dict[str, ErrorEntry] = {}  # standing non-layer problems by reason
        self.previous: dict[str, Mapping[str, Any]] = {}
        self.changed = asyncio.Event()
        #: False until the first inventory: until then the book knows nothing to report.
        self.synced = False

    def touch(self) -> None:
        """Mark the status as changed: the reporter patches it soon."""
        self.changed.set()

    def fetched(self, source: FetchSource, size: int) -> None:
        """Count ``size`` bytes received from ``source``."""
        if source == "upstream":
            self.upstream += size
        else:
            self.peer += size
        self.metrics.fetched(source, size)
        self.touch()

    def served_bytes(self, size: int) -> None:
        """Count ``size`` bytes sent to a peer."""
        self.served += size
        self.metrics.served(size)
        self.touch()

    def error(self, reason: str, message: str, digest: str | None = None) -> ErrorEntry:
        """Record a failure (newest first), count it, and return its entry."""
        text = redact(message, self.secrets())[:MAX_ERROR_MESSAGE]
        entry = ErrorEntry(reason, text, digest)
        self.errors.appendleft(entry)
        self.metrics.error(reason)
        log.warning("%s: %s", reason, text, extra={"reason": reason, "digest": digest})
        self.touch()
        return entry

    def conditions(self) -> list[dict[str, Any]]:
        """``Ready``, ``Progressing`` and ``Degraded`` for the current facts."""
        missing = self.wanted - self.held
        done = missing == 0 and self.images_pending == 0 and self.chains_pending == 0
        if done:
            ready = ("True", Reason.ALL_LAYERS_HELD, f"{self.held} of {self.wanted} layers held"
                     + (f", {self.chains_unpacked} chains unpacked" if self.chains_wanted
                        else ""))
        elif missing:
            ready = ("False", Reason.LAYERS_MISSING, f"{missing} of {self.wanted} layers missing")
        elif self.images_pending:
            ready = ("False", Reason.IMAGES_PENDING, f"{self.images_pending} images not pulled yet")
        else:
            ready = ("False", Reason.CHAINS_PENDING,
                     f"{self.chains_pending} of {self.chains_wanted} chains not unpacked yet")
        progressing: tuple[str, str, str]
        if self.paused:
            progressing = ("False", Reason.PAUSED, "spec.paused is set")
        elif done:
            progressing = ("False", Reason.COMPLETE, "nothing left to fetch")
        elif self.pressure is not None:
            progressing = ("False", self.pressure[0], self.pressure[1])
        else:
            progressing = ("True", Reason.FETCHING if self.busy else Reason.WAITING_TO_RETRY,
                           f"{missing} layers, {self.images_pending} images and "
                           f"{self.chains_pending} chains to go")
        degraded = self._degraded()
        return [self._condition(kind, *values) for kind, values in
                (("Ready", ready), ("Progressing", progressing), ("Degraded", degraded))]

    def _degraded(self) -> tuple[str, str, str]:
        if self.pressure is not None:
            return "True", self.pressure[0], self.pressure[1]
        if self.failing:
            latest = next((e for e in self.errors if e in self.failing.values()),
                          next(iter(self.failing.values())))
            return ("True", latest.reason,
                    f"{len(self.failing)} failing; latest: {latest.message}")
        if self.problems:
            problem = next(iter(self.problems.values()))
            return "True", problem.reason, problem.message
        return "False", Reason.AS_EXPECTED, "no failures"

    def _counters(self) -> ByteCounters:
        return ByteCounters(upstream=self.upstream, peer=self.peer, served_to_peers=self.served)

    def _bytes(self) -> dict[str, int]:
        return self._counters().to_dict()

    def _human(self) -> HumanBytes:
        # For `kubectl get nlc`'s byte columns: a printer column cannot format a number.
        return HumanBytes(bytes_held=human_bytes(self.bytes_held),
                          upstream=human_bytes(self.upstream), peer=human_bytes(self.peer))

    def _condition(self, kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
        built = condition(self.previous, kind, status, reason,
                          message, self.generation)
        self.previous[kind] = built
        return built

    def body(self) -> dict[str, Any]:
        """The ``status`` object to patch: whole once synced, else endpoint and counters.

        A `layercache.api.NodeLayerCacheStatus` as the CRD's dict.
        """
        return self.status().to_dict()

    def status(self) -> NodeLayerCacheStatus:
        """The ``status`` (see `body`); ``peerEndpoint`` and ``disk`` only once known."""
        known: dict[str, Any] = {}
        if self.peer_endpoint is not None:
            known["peer_endpoint"] = self.peer_endpoint
        if not self.synced:  # claim nothing about layers before containerd was asked
            return NodeLayerCacheStatus(bytes=self._counters(), last_sync=now_iso(), **known)
        if self.disk is not None:
            known["disk"] = self.disk.to_model()
        return NodeLayerCacheStatus(
            observed_generation=self.generation,
            layers=LayerCounts(wanted=self.wanted, held=self.held, bytes_held=self.bytes_held),
            chains=ChainCounts(wanted=self.chains_wanted, unpacked=self.chains_unpacked,
                               bytes_unpacked=self.bytes_unpacked),
            missing=list(self.missing),
            bytes=self._counters(),
            human=self._human(),
            errors=[entry.to_model() for entry in self.errors],
            disk_pressure=self.pressure is not None,
            conditions=[Condition.model_validate(c) for c in self.conditions()],
            last_sync=now_iso(),
            **known,
        )


class StatusReporter:
    """Patches `StatusBook.body` through ``patch``: at most once per ``interval`` seconds."""

    def __init__(self, book: StatusBook,
                 patch: Callable[[dict[str, Any]], Awaitable[None]], interval: float) -> None:
        self.book = book
        self.patch = patch
        self.interval = interval
        self._lock = asyncio.Lock()
        self._sent: dict[str, Any] | None = None
        self._sent_at = 0.0

    async def run(self) -> None:
        """Patch whenever the book changes, with ``interval`` seconds between patches."""
        while True:
            await self.book.changed.wait()
            await self.flush()
            await asyncio.sleep(self.interval)

    async def flush(self) -> bool:
        """Patch now, unless nothing but `lastSync` changed since the last patch.

        An unchanged status is not re-sent (at most every `HEARTBEAT_SECONDS`): each patch is
        a watch event for this agent and the operator, and an idle cluster of 1,000 nodes
        must not write 500 statuses a second. True when the apiserver has the status.
        """
        async with self._lock:
            self.book.changed.clear()
            body = self.book.body()
            same = {k: v for k, v in body.items() if k != "lastSync"}
            now = asyncio.get_running_loop().time()
            if same == self._sent and now - self._sent_at < HEARTBEAT_SECONDS:
                return True
            try:
                await self.patch(body)
            except ApiException as error:
                if error.status != 404:  # 404: our NodeLayerCache is gone; nothing to report
                    log.warning("status patch refused: HTTP %s %s", error.status,
                                error.reason)
                    self.book.touch()
                return False
            except Exception as error:
                log.warning("status patch failed: %s", error)
                self.book.touch()
                return False
            self._sent, self._sent_at = same, now
            return True
