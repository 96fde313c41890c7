"""Cut-through fan-out: peers read a layer from a node while that node still receives it.

containerd serves only committed blobs (``Content.Read``), so a node cannot hand out an
ingest it is still writing. A `Relay` keeps the node's own received buffers instead — the
very ``bytes`` objects it passes to containerd, no copy — from byte 0 in order, and lets
any number of readers follow it: `Relay.read` yields what is there from an offset, then
waits for more, until the blob's size is reached. The peer server
(`layercache.agent.peer.server`) answers a ``GET`` of a blob it does not hold yet from its relay
(``Range`` too); the peer writes those bytes into its own ingest as from any source. Every
transfer is relayed, from upstream (the seeder) or from a peer: a layer flows down its
relay tree (`layercache.plan.distribute`) node to node while the seeder still receives it.

Nothing here is trusted more than before: relayed bytes are what the seeder's upstream
sent, unverified until a COMMIT; every node's own containerd verifies the whole blob at
*its* COMMIT (`layercache.agent.fetch.transfer`). A relay whose transfer fails (wrong bytes,
the upstream gave up, the fetch was cancelled) is `Relay.fail`-ed: its readers stop
mid-body, their nodes see a short body, drop this peer and resume from upstream or another
holder. A node killed outright closes its connections: the same, seen from the peer. A
node whose peer cut it short goes on relaying what it then receives from the registry.

`Relays` is the agent's book of them. It bounds the memory relays hold (``budget`` bytes
over all blobs being received, each counted whole from its first bytes on — not while its
fetch still waits for a peer or a transfer slot; a layer that does not fit then is not
relayed, and the nodes below wait for its commit or, after their grace, take another
peer). Peer copies share the budget with everything else; the layers this node seeds
have a budget of their own besides: a seeder's relay is the root of its layer's whole tree,
and a node's peer copies (about half of them, the tree's leaves, have no reader at all)
must not leave it without room. So relays hold at most twice ``budget``.
It also tells waiting peers when a blob
becomes available (`Relays.wait_available`: the peer server's long-poll ``HEAD ?wait=``),
so waiting nodes learn of a layer when its first bytes arrive, not at their next poll —
and not before: a seeder the registry refuses offers nothing.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import Final

from layercache.containerd.ingest import ResumableSource
from layercache.oci.digest import Digest

__all__ = ["DEFAULT_BUDGET", "LIMIT_SHARE", "Relay", "RelayFailedError", "Relays", "default_budget",
           "relayed"]

#: Most bytes the relays of one agent hold at once for peer copies, and again for the layers
#: it seeds (`Relays`), when its memory is not limited.
DEFAULT_BUDGET: Final = 128 * 1024 * 1024
#: Under a memory limit each budget is at most this share of it (1/8: both together a
#: quarter). The rest is the agent's own: about 110 MB resident when idle, plus up to
#: ``WRITE_WINDOW`` WRITEs of ``MAX_WRITE_BYTES`` and the received buffers per transfer in
#: flight. Budgets of half the default 512 MiB limit got agents OOM-killed mid-transfer on
#: a busy machine (resident 400 to 450 MB while warming, measured in the e2e tests).
LIMIT_SHARE: Final = 8


def default_budget(memory_limit: int | None) -> int:
    """The relay budget (bytes) for an agent limited to ``memory_limit`` bytes (None: none).

    `DEFAULT_BUDGET`, or `LIMIT_SHARE`-th of the limit when that is less.
    """
    if memory_limit is None:
        return DEFAULT_BUDGET
    return min(DEFAULT_BUDGET, memory_limit // LIMIT_SHARE)


class RelayFailedError(Exception):
    """The transfer of a relayed blob failed: readers must stop (a short body)."""


class Relay:
    """One blob of ``size`` bytes being received, readable from any offset while it grows."""

    def __init__(self, digest: Digest, size: int,
                 on_start: Callable[[], None] | None = None,
                 admit: Callable[[Relay], bool] | None = None) -> None:
        """A relay of blob ``digest`` (``size`` bytes); ``on_start`` runs at its first bytes.

        ``admit`` is asked at the first bytes, with this relay, whether they may be kept (a
        memory budget); if not, the relay is failed before anyone could read it: never
        offered. (It is given the relay rather than holding it: a closure over the relay
        would make a reference cycle, and the blob's bytes would wait for the cyclic
        garbage collector instead of going with the last reader.)
        """
        self.digest = digest
        self.size = size
        self._on_start = on_start
        self._admit = admit
        #: Whether this node seeds the blob (receives it upstream as planned): its relay
        #: counts against the seeded layers' own budget (`Relays`).
        self.seeding = False
        self._chunks: list[bytes] = []
        self._starts: list[int] = []  # offset of each chunk
        self.length = 0  # bytes held, from 0
        self.error: str | None = None
        self._grown = asyncio.Event()

    def feed(self, offset: int, chunk: bytes) -> None:
        """Bytes ``offset .. offset + len(chunk)`` of the blob arrived at this node.

        Only what extends the held prefix is kept: a retry resuming from containerd's
        offset (at most ``length``) repeats bytes already here; a gap (an offset past
        ``length``: the ingest held bytes this relay never saw) fails the relay.
        """
        end = offset + len(chunk)
        if end <= self.length or self.error is not None:
            return
        if offset > self.length:
            self.fail(f"bytes from {offset} arrived with only {self.length} held")
            return
        started = self.length == 0
        if started and self._admit is not None and not self._admit(self):
            self.fail("over the relay memory budget")
            return
        piece = chunk if offset == self.length else chunk[self.length - offset:]
        self._starts.append(self.length)
        self._chunks.append(piece)
        self.length = end
        self._wake()
        if started and self._on_start is not None:
            self._on_start()

    @property
    def started(self) -> bool:
        """Whether bytes arrived and none went wrong: only then is it offered to peers."""
        return self.length > 0 and self.error is None

    def fail(self, why: str) -> None:
        """This node's transfer failed (``why``): readers stop with `RelayFailedError`."""
        if self.error is None:
            self.error = why
            self._wake()

    def _wake(self) -> None:
        self._grown.set()
        self._grown = asyncio.Event()

    def _pieces(self, offset: int, end: int) -> Iterator[memoryview]:
        index = bisect.bisect_right(self._starts, offset) - 1
        while offset < end and index < len(self._chunks):
            start = self._starts[index]
            chunk = self._chunks[index]
            stop = min(len(chunk), end - start)
            yield memoryview(chunk)[offset - start:stop]
            offset = start + stop
            index += 1

    async def read(self, offset: int, end: int) -> AsyncIterator[memoryview]:
        """Bytes ``offset`` up to (excluding) ``end``, as they arrive; views, no copies.

        Raises:
            RelayFailedError: this node's transfer failed before ``end`` was reached.

        """
        while offset < end:
            grown = self._grown
            if self.error is not None:
                raise RelayFailedError(f"relay of {self.digest.short} failed: {self.error}")
            if self.length > offset:
                for view in self._pieces(offset, min(end, self.length)):
                    yield view
                    offset += len(view)
                continue
            await grown.wait()


class Relays:
    """The agent's relays by digest, their memory budget and availability notices.

    ``budget``: bytes the relays of layers this node seeds may hold together, and bytes
    all relays may hold together before a peer copy is not relayed (`DEFAULT_BUDGET`).
    """

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.held = 0  # bytes of every relay counted
        self.seeded = 0  # of those, relays of layers this node seeds
        self._relays: dict[Digest, Relay] = {}
        self._available: dict[Digest, asyncio.Event] = {}
        self._announced: set[Digest] = set()  # so a waiter that comes late does not wait

    def get(self, digest: Digest) -> Relay | None:
        """The relay of ``digest`` once this node receives bytes of it, else None.

        Not before the first bytes: a registry that refuses the seeder (401, 429, a reset)
        would otherwise have told waiting peers "held" for a blob no byte of which arrives,
        and their ``GET`` would find nothing (a 404 they drop the seeder for).
        """
        relay = self._relays.get(digest)
        return relay if relay is not None and relay.started else None

    @contextlib.contextmanager
    def receiving(self, digest: Digest, size: int) -> Iterator[Relay | None]:
        """A relay for the block's transfer of ``digest`` (None: one runs already).

        Its ``size`` counts against the budget from its first bytes (for a relay marked
        `Relay.seeding` by then, the seeded layers' own budget); a relay that does not fit
        then is never offered (`Relay.started` stays False). On leaving the block the
        relay is no longer offered to new readers; readers that have it finish from it; an
        exception fails it. Either way the memory is released from the budget (readers
        still holding it keep it alive until they end).
        """
        if digest in self._relays:
            yield None
            return
        counted = seeded = False

        def admit(which: Relay) -> bool:
            nonlocal counted, seeded
            seeded = which.seeding  # as counted: released the same way, whatever it is later
            counted = (self.seeded if seeded else self.held) + size <= self.budget
            if counted:
                self.held += size
                self.seeded += size if seeded else 0
            return counted

        relay = Relay(digest, size, on_start=lambda: self.announce(digest), admit=admit)
        self._relays[digest] = relay
        try:
            yield relay
        except BaseException as error:
            relay.fail(f"{error.__class__.__name__}: {error}")
            raise
        finally:
            self._relays.pop(digest, None)
            if counted:
                self.held -= size
                self.seeded -= size if seeded else 0
            if relay.length < relay.size:
                relay.fail("the transfer stopped before its end")

    def announce(self, digest: Digest) -> None:
        """``digest`` can be read here now (a relay started, or it was committed)."""
        self._announced.add(digest)
        event = self._available.pop(digest, None)
        if event is not None:
            event.set()

    async def wait_available(self, digest: Digest, seconds: float) -> None:
        """Return once ``digest`` is (or was ever) `announce`-d, or after ``seconds``."""
        if digest in self._announced:
            return
        event = self._available.setdefault(digest, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()


def relayed(source: ResumableSource, relay: Relay) -> ResumableSource:
    """``source`` with every buffer it yields also fed to ``relay`` at its offset."""

    def from_offset(offset: int) -> AsyncIterable[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            at = offset
            inner = source(offset)
            try:
                async for chunk in inner:
                    relay.feed(at, chunk)
                    at += len(chunk)
                    yield chunk
            finally:  # close the source's connection now, not at garbage collection
                aclose = getattr(inner, "aclose", None)
                if aclose is not None:
                    await aclose()
        return chunks()

    return from_offset
