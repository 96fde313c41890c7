"""The agent's status: what it counts and finds, as the NodeLayerCache ``status`` it patches.

`StatusBook` keeps the facts (inventory counts, byte counters, recent errors, disk
pressure) and renders the ``status`` object of the CRD: ``peerEndpoint``, ``layers``,
``chains`` (wanted, unpacked, bytes extracted; Ready waits for the chains as for the
blobs, except where the snapshotter is unsupported: then none can be unpacked and status
says so in Degraded),
``missing``, ``bytes``, ``disk`` (`layercache.agent.disksavings`), ``errors`` (≤ 20,
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

from layercache.agent.disksavings import NodeDisk
from layercache.agent.nodespec import Counters
from layercache.conditions import condition, now_iso
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

    def to_status(self) -> dict[str, str]:
        """The ``status.errors[]`` item."""
        item = {"reason": self.reason, "message": self.message}
        if self.digest is not None:
            item["digest"] = self.digest
        return item


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
            ready = ("True", "AllLayersHeld", f"{self.held} of {self.wanted} layers held"
                     + (f", {self.chains_unpacked} chains unpacked" if self.chains_wanted
                        else ""))
        elif missing:
            ready = ("False", "LayersMissing", f"{missing} of {self.wanted} layers missing")
        elif self.images_pending:
            ready = ("False", "ImagesPending", f"{self.images_pending} images not pulled yet")
        else:
            ready = ("False", "ChainsPending",
                     f"{self.chains_pending} of {self.chains_wanted} chains not unpacked yet")
        if self.paused:
            progressing = ("False", "Paused", "spec.paused is set")
        elif done:
            progressing = ("False", "Complete", "nothing left to fetch")
        elif self.pressure is not None:
            progressing = ("False", self.pressure[0], self.pressure[1])
        else:
            progressing = ("True", "Fetching" if self.busy else "WaitingToRetry",
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
        return "False", "AsExpected", "no failures"

    def _bytes(self) -> dict[str, int]:
        return {"upstream": self.upstream, "peer": self.peer, "servedToPeers": self.served}

    def _human(self) -> dict[str, str]:
        # For `kubectl get nlc`'s byte columns: a printer column cannot format a number.
        return {"bytesHeld": human_bytes(self.bytes_held), "upstream": human_bytes(self.upstream),
                "peer": human_bytes(self.peer)}

    def _condition(self, kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
        built = condition(self.previous, kind, status, reason,
                          message, self.generation)
        self.previous[kind] = built
        return built

    def body(self) -> dict[str, Any]:
        """The ``status`` object to patch: whole once synced, else endpoint and counters."""
        if not self.synced:  # claim nothing about layers before containerd was asked
            early: dict[str, Any] = {"bytes": self._bytes(), "lastSync": now_iso()}
            if self.peer_endpoint is not None:
                early["peerEndpoint"] = self.peer_endpoint
            return early
        status: dict[str, Any] = {
            "observedGeneration": self.generation,
            "layers": {"wanted": self.wanted, "held": self.held, "bytesHeld": self.bytes_held},
            "chains": {"wanted": self.chains_wanted, "unpacked": self.chains_unpacked,
                       "bytesUnpacked": self.bytes_unpacked},
            "missing": list(self.missing),
            "bytes": self._bytes(),
            "human": self._human(),
            "errors": [entry.to_status() for entry in self.errors],
            "diskPressure": self.pressure is not None,
            "conditions": self.conditions(),
            "lastSync": now_iso(),
        }
        if self.peer_endpoint is not None:
            status["peerEndpoint"] = self.peer_endpoint
        if self.disk is not None:
            status["disk"] = self.disk.to_status()
        return status


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
