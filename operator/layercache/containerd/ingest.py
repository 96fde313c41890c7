"""The content store's Write protocol: one ingest stream, from STAT to COMMIT.

containerd ``Content.Write`` is a bidirectional stream of ``WriteContentRequest`` →
``WriteContentResponse``, one response per request (``contentserver.go``):

1. STAT (ref, total, expected) opens, or reopens, the ingest ``ref`` and locks it for this
   stream; the reply's ``offset`` is how many bytes the ingest already holds: the resume
   point. ``ALREADY_EXISTS`` here means the blob is committed already.
2. WRITE (offset, data) appends; ``offset`` must equal the ingest's offset (a WRITE at 0
   truncates the ingest, which is how a non-resumable source starts over). The reply's
   offset is the new size. The server handles requests in order, one reply each, so up to
   `WRITE_WINDOW` WRITEs are sent before their replies are read (`write_stream`): the
   source's next bytes arrive while containerd writes the last ones, instead of one round
   trip per message. Each received buffer goes out as one WRITE as it is (`coalesce`
   joins only pieces smaller than `CHUNK_BYTES` and splits only ones over
   `MAX_WRITE_BYTES`): no copy into fixed-size pieces. When the source fails, the WRITEs
   in flight are answered before the stream ends, so the ingest keeps every byte sent
   and the retry's STAT resumes after them.
3. COMMIT (total, expected, labels) makes the ingest the blob ``expected`` with ``labels``;
   containerd checks size and digest here: a mismatch is ``FAILED_PRECONDITION`` and the
   ingest stays (the caller aborts it). ``ALREADY_EXISTS`` means someone committed it first.
4. Close the sending side and read the stream to its end: the server sends its last reply
   once more when the stream closes cleanly.

What an agent ingest costs after issue 15 (bench B, 1 GiB from a loopback registry): 2.7
client CPU-s per GiB against ``ctr content fetch``'s 2.2. A profile of the same path in one
process (cProfile on thread time, 4.5 CPU-s per GiB with its overhead): socket reads and
aiohttp's parser about 29 %, gRPC's send about 24 % (its C-core thread 0.77 s, the Python
call 0.3 s), the one ``join`` per WRITE about 9 %, and the event loop's scheduling (timers,
callbacks) most of the rest.

This module runs that exchange; `layercache.containerd.content.ContentStore.write` adds the
lease, the abort on failure and the labels of a blob that already existed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import re
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import grpc

from layercache.backoff import Backoff
from layercache.containerd.channel import Client
from layercache.containerd.errors import (
    ContainerdError,
    FailedPrecondition,
    OutOfRange,
    Unavailable,
)
from layercache.containerd.protos import content_pb2
from layercache.oci.digest import Digest, DigestMismatchError, InvalidDigestError

__all__ = [
    "CHUNK_BYTES",
    "INGEST_LEASE_EXPIRY",
    "LOCK_WAIT",
    "ChunkSource",
    "ContentDigestMismatchError",
    "ResumableSource",
    "SourceSizeError",
    "WriteOutcome",
    "WriteResult",
    "coalesce",
    "ingest_lease_id",
    "ingest_ref",
    "write_stream",
]

#: Least bytes of data per WRITE message (but the last): smaller received pieces are joined
#: up to this (containerd's own clients copy in 1 MiB buffers).
CHUNK_BYTES: Final = 1024 * 1024
#: Most bytes of data per WRITE message: well under containerd's 16 MiB gRPC message limit.
MAX_WRITE_BYTES: Final = 4 * 1024 * 1024
#: WRITE requests sent ahead of their replies (see the module docstring).
WRITE_WINDOW: Final = 4
#: The Write method of ``containerd.services.content.v1.Content`` (a bidirectional stream).
WRITE_METHOD: Final = "/containerd.services.content.v1.Content/Write"
#: Tag of ``WriteContentRequest.data`` (field 6, length-delimited).
_DATA_TAG: Final = bytes([6 << 3 | 2])
#: Seconds to wait for an ingest ref locked by another stream before giving up (Unavailable).
LOCK_WAIT: Final = 10.0
#: Waits between STATs of a locked ref: 50 ms doubling to 1 s, jittered.
_LOCK_BACKOFF: Final = Backoff(0.05, 1.0, jitter=True)

#: Seconds the lease of an ingest kept for a resume lives (its ``containerd.io/gc.expire``):
#: long enough to resume after an agent restart, short enough not to hold disk for long.
INGEST_LEASE_EXPIRY: Final = 24 * 3600.0

#: A resumable source: called with a byte offset, it yields the blob's bytes from there.
ResumableSource = Callable[[int], AsyncIterable[bytes]]
#: What `write_stream` accepts: a resumable source, or plain bytes from the start.
ChunkSource = ResumableSource | AsyncIterable[bytes]

_COMMIT_DIGEST = re.compile(r"unexpected commit digest (\S+), expected")


def ingest_ref(digest: str) -> str:
    """Our ingest ref for blob ``digest``: one per digest, so a retry resumes its ingest."""
    return f"layercache-{Digest(digest)}"


def ingest_lease_id(ref: str) -> str:
    """The id of the lease a write of ``ref`` makes for itself when given none.

    One per ref, so a resumed write finds (and finally deletes) the lease of the first.
    """
    return f"layercache-ingest-{hashlib.sha256(ref.encode()).hexdigest()[:24]}"


class ContentDigestMismatchError(DigestMismatchError):
    """containerd refused the COMMIT: the ingest's bytes hash to another digest.

    A `DigestMismatchError` (``expected``, ``actual``, ``size`` in bytes) that also names
    the ``socket`` and ingest ``ref``; the ingest has been aborted when this reaches you.
    """

    def __init__(self, expected: Digest, actual: Digest, size: int, *, socket: str,
                 ref: str) -> None:
        super().__init__(expected, actual, size)
        self.args = (f"{self.args[0]} (ingest ref {ref!r} on containerd {socket})",)
        self.socket = socket
        self.ref = ref


class SourceSizeError(Exception):
    """The source yielded more or fewer bytes than the ``total`` announced for the blob."""

    def __init__(self, ref: str, expected: Digest, total: int, got: int, *, more: bool) -> None:
        amount = f"more than {total}" if more else f"{got} of {total}"
        super().__init__(f"source of {expected} (ingest ref {ref!r}) gave {amount} bytes")
        self.ref = ref
        self.expected = expected
        self.total = total
        self.got = got


@dataclass(frozen=True)
class WriteOutcome:
    """A committed Write stream, in bytes.

    ``resumed_from``: what the ingest held already (not sent again); ``written``: what
    this stream sent.
    """

    resumed_from: int
    written: int


@dataclass(frozen=True)
class WriteResult:
    """A committed (or already present) blob: ``digest`` and ``size`` (bytes).

    ``resumed_from``: bytes the ingest held already, not sent again; ``written``: bytes sent
    by this call; ``already_existed``: the blob was there before (nothing committed, our
    labels added to it).
    """

    digest: Digest
    size: int
    resumed_from: int
    written: int
    already_existed: bool


def _split(data: bytes, most: int) -> Iterator[bytes]:
    if len(data) <= most:
        yield data
    else:
        for start in range(0, len(data), most):
            yield data[start:start + most]


async def coalesce(chunks: AsyncIterable[bytes], least: int = CHUNK_BYTES,
                   most: int = MAX_WRITE_BYTES) -> AsyncGenerator[bytes, None]:
    """``chunks`` as WRITE payloads of ``least`` to ``most`` bytes (the last may be shorter).

    A chunk already in that range is passed on as it is (no copy: the common case of large
    reads); smaller ones are joined until they reach ``least``, larger ones split.
    """
    held: list[bytes] = []
    count = 0
    async for chunk in chunks:
        if not held and least <= len(chunk) <= most:
            yield bytes(chunk)  # bytes(bytes) is the same object: no copy
            continue
        held.append(chunk)
        count += len(chunk)
        if count >= least:
            data = held[0] if len(held) == 1 else b"".join(held)
            held.clear()
            count = 0
            for piece in _split(bytes(data), most):
                yield piece
    if held:
        for piece in _split(b"".join(held), most):
            yield piece


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def write_request(offset: int, data: bytes) -> bytes:
    """The serialized ``WriteContentRequest{action: WRITE, offset, data}``.

    Protobuf's own serializer copies ``data`` at about 1 GB/s here (upb: 1 to 5 CPU-s per
    GiB measured); this is the same wire form (the small fields serialized by protobuf,
    then field 6, ``data``, as tag, length and the bytes) in one ``join``: a memcpy.
    """
    head = content_pb2.WriteContentRequest(action=content_pb2.WRITE,
                                           offset=offset).SerializeToString()
    return b"".join((head, _DATA_TAG, _varint(len(data)), data))


def _serialize(request: content_pb2.WriteContentRequest | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


class _Stream:
    """One Write call: send a request, read its one reply within the client's timeout.

    Requests are messages, or WRITEs already serialized by `write_request`.
    """

    def __init__(self, client: Client, lease: str, ref: str) -> None:
        self.client = client
        self.ref = ref
        write = client.channel.stream_stream(
            WRITE_METHOD, request_serializer=_serialize,
            response_deserializer=content_pb2.WriteContentResponse.FromString)
        self.call = write(metadata=client.metadata(lease))

    def _timeout(self, what: str) -> Unavailable:
        return Unavailable(socket=self.client.socket, subject=f"ingest ref {self.ref!r}",
                           operation="Content.Write", code=None,
                           details=f"{what} in {self.client.timeout:g} s")

    async def send(self, request: content_pb2.WriteContentRequest | bytes) -> None:
        """Send one request without reading its reply (`receive` reads replies in order)."""
        try:
            async with asyncio.timeout(self.client.timeout):
                await self.call.write(request)
        except TimeoutError:
            raise self._timeout("request not taken") from None

    async def exchange(self, request: content_pb2.WriteContentRequest,
                       ) -> content_pb2.WriteContentResponse:
        """Send one request and read its reply."""
        await self.send(request)
        return await self.receive()

    async def receive(self) -> content_pb2.WriteContentResponse:
        """Read the next reply."""
        try:
            async with asyncio.timeout(self.client.timeout):
                response = await self.call.read()
        except TimeoutError:
            raise self._timeout("no reply") from None
        if response is grpc.aio.EOF:
            raise ContainerdError(socket=self.client.socket, subject=f"ingest ref {self.ref!r}",
                                  operation="Content.Write", code=None,
                                  details="stream ended before its reply")
        reply: content_pb2.WriteContentResponse = response
        return reply

    async def finish(self) -> None:
        """Close our side, then read to the end (the server repeats its last reply)."""
        await self.call.done_writing()
        async with asyncio.timeout(self.client.timeout):
            while await self.call.read() is not grpc.aio.EOF:
                pass


async def _open(client: Client, lease: str, ref: str, stat: content_pb2.WriteContentRequest,
                ) -> tuple[_Stream, content_pb2.WriteContentResponse]:
    """Open the stream with STAT, waiting out a lock held by another (dying) stream.

    containerd's ``content.OpenWriter`` retries the same way: a ref stays locked until the
    server notices that the previous stream on it ended.
    """
    deadline = asyncio.get_running_loop().time() + LOCK_WAIT
    attempt = 1
    while True:
        stream = _Stream(client, lease, ref)
        try:
            return stream, await stream.exchange(stat)
        except grpc.RpcError as error:
            stream.call.cancel()
            locked = (error.code() == grpc.StatusCode.UNAVAILABLE
                      and "locked" in (error.details() or ""))
            if (not locked or asyncio.get_running_loop().time() + _LOCK_BACKOFF.step(attempt)
                    > deadline):
                raise
        except BaseException:
            stream.call.cancel()
            raise
        await asyncio.sleep(_LOCK_BACKOFF.delay(attempt))
        attempt += 1


def _is_resumable(source: ChunkSource) -> bool:
    return not hasattr(source, "__aiter__") and callable(source)


def _mismatch(error: FailedPrecondition, expected: Digest, total: int,
              ref: str) -> ContentDigestMismatchError | None:
    match = _COMMIT_DIGEST.search(error.details)
    if match is None:
        return None
    try:
        actual = Digest(match.group(1))
    except InvalidDigestError:
        return None
    return ContentDigestMismatchError(expected, actual, total, socket=error.socket, ref=ref)


async def write_stream(client: Client, *, ref: str,
                       expected: Digest, total: int, source: ChunkSource,
                       labels: Mapping[str, str], lease: str) -> WriteOutcome:
    """Run one Write stream for ingest ``ref`` under ``lease``; see the module docstring.

    A resumable ``source`` is called with the STAT offset and only the missing bytes are
    sent; a plain iterable starts over at 0 (truncating the ingest). Cleanup (abort, lease)
    is the caller's.

    Raises:
        AlreadyExists: the blob is committed already (at STAT or COMMIT): success for the
            caller, which then labels it.
        ContentDigestMismatchError: COMMIT found another digest.
        SourceSizeError: the source gave more or fewer than ``total`` bytes.
        OutOfRange / FailedPrecondition / Unavailable / ContainerdError: as containerd said.

    """
    subject = f"ingest ref {ref!r} ({expected.short}, {total} bytes)"
    stat = content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref, total=total,
                                           expected=expected)
    with client.errors(subject, "Content.Write"):
        stream, reply = await _open(client, lease, ref, stat)
    try:
        resumable = _is_resumable(source)
        start = reply.offset if resumable and reply.offset <= total else 0
        sent = start
        chunks: AsyncIterable[bytes]
        if resumable:
            assert callable(source)
            chunks = source(start)
        else:
            assert not callable(source)
            chunks = source
        pieces = coalesce(chunks)
        unanswered: collections.deque[int] = collections.deque()  # offsets after each WRITE

        async def answered() -> None:
            reply = await stream.receive()
            after = unanswered.popleft()
            if reply.offset != after:
                raise OutOfRange(socket=client.socket, subject=subject,
                                 operation="Content.Write", code=None,
                                 details=f"ingest at {reply.offset} after writing up to {after}")

        async def all_answered() -> None:
            while unanswered:
                await answered()

        try:
            with client.errors(subject, "Content.Write"):
                while True:
                    try:
                        piece = await anext(pieces)
                    except StopAsyncIteration:
                        break
                    except Exception:
                        # The source failed: let containerd take the WRITEs already sent
                        # before the stream is cancelled. A cancel can overtake WRITEs in
                        # flight, and a resume would then fetch their bytes again.
                        with contextlib.suppress(Exception):
                            await all_answered()
                        raise
                    if sent + len(piece) > total:
                        raise SourceSizeError(ref, expected, total, sent + len(piece),
                                              more=True)
                    await stream.send(write_request(sent, piece))
                    sent += len(piece)
                    unanswered.append(sent)
                    if len(unanswered) >= WRITE_WINDOW:
                        await answered()
                await all_answered()
        finally:
            # Close both generators now, not at garbage collection: a source may hold a
            # connection or a file that should go when the write stops.
            await pieces.aclose()
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        if sent != total:
            raise SourceSizeError(ref, expected, total, sent, more=False)
        try:
            with client.errors(subject, "Content.Write"):
                await stream.exchange(content_pb2.WriteContentRequest(
                    action=content_pb2.COMMIT, offset=sent, total=total, expected=expected,
                    labels=dict(labels)))
                await stream.finish()
        except FailedPrecondition as error:
            raise _mismatch(error, expected, total, ref) or error from None
        return WriteOutcome(resumed_from=start, written=sent - start)
    finally:
        stream.call.cancel()  # no-op after a clean end; releases the ref's lock otherwise
