"""Errors of the containerd and CRI clients: one exception class per gRPC status we act on.

containerd maps its ``errdefs`` errors onto gRPC status codes (``errdefs/grpc.go``:
``ErrNotFound`` → ``NOT_FOUND``, ``ErrAlreadyExists`` → ``ALREADY_EXISTS``,
``ErrFailedPrecondition`` → ``FAILED_PRECONDITION``, ``ErrUnavailable`` → ``UNAVAILABLE``,
…); `from_rpc_error` maps them back onto these classes, so callers branch on a type, not on
a status code. ``retryable`` says whether the same call may succeed later unchanged
(a busy or restarting daemon, a locked ingest ref) or not (absent, conflicting or bad input).

Every message names the socket and what the call was about (a digest, an ingest ref, a
lease id, an image reference), never credentials: callers pass the secrets of the call and
they are blanked out of the daemon's details before the message is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import grpc

from layercache.redact import redact

__all__ = [
    "AlreadyExists",
    "ContainerdError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "Unavailable",
    "from_rpc_error",
    "rpc_errors",
]

class ContainerdError(Exception):
    """A containerd (or CRI) call failed.

    Attributes:
        socket: the containerd socket path the call went to.
        subject: what the call was about, e.g. ``content sha256:…`` or ``ingest ref …``.
        operation: the call, e.g. ``Content.Info``.
        code: the gRPC status code name (``NOT_FOUND`` …), or None for client-side errors.
        details: the daemon's error text, with the call's secrets blanked out.

    """

    #: Whether the same call may succeed if made again later.
    retryable: ClassVar[bool] = False

    def __init__(self, *, socket: str, subject: str, operation: str, code: str | None,
                 details: str) -> None:
        where = f"{operation} of {subject}" if subject else operation
        status = f"{code}: " if code else ""
        super().__init__(f"{where} on containerd {socket} failed: {status}{details}")
        self.socket = socket
        self.subject = subject
        self.operation = operation
        self.code = code
        self.details = details


class NotFound(ContainerdError):
    """The blob, ingest, lease or image does not exist (``NOT_FOUND``)."""


class AlreadyExists(ContainerdError):
    """The object exists already (``ALREADY_EXISTS``); for a blob write that is success."""


class FailedPrecondition(ContainerdError):
    """The call does not fit the object's state (``FAILED_PRECONDITION``).

    E.g. a commit whose size or digest differs from the expected one, or a missing namespace.
    """


class InvalidArgument(ContainerdError):
    """The request is malformed (``INVALID_ARGUMENT``), e.g. an empty ref or a bad filter."""


class OutOfRange(ContainerdError):
    """A write offset does not match the ingest's offset (``OUT_OF_RANGE``)."""


class PermissionDenied(ContainerdError):
    """The daemon refused the caller (``PERMISSION_DENIED`` or ``UNAUTHENTICATED``)."""


class Unavailable(ContainerdError):
    """Retry later: the daemon is unreachable or busy, or the ingest ref is locked.

    Covers ``UNAVAILABLE`` (socket missing or refusing, a ref locked by another writer),
    ``DEADLINE_EXCEEDED`` (our timeout) and ``ABORTED``.
    """

    retryable: ClassVar[bool] = True


_BY_CODE: dict[grpc.StatusCode, type[ContainerdError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.ABORTED: Unavailable,
}


def from_rpc_error(error: grpc.RpcError, *, socket: str, subject: str, operation: str,
                   secrets: Iterable[str] = ()) -> ContainerdError:
    """The `ContainerdError` subclass for a failed gRPC call (not raised, returned).

    Args:
        error: the call's error; ``grpc.aio.AioRpcError`` and sync ``grpc.RpcError`` calls
            both carry ``code()`` and ``details()``.
        socket: the containerd socket path, for the message.
        subject: what the call was about (digest, ref, lease id, image reference).
        operation: the service and method, e.g. ``Content.Write``.
        secrets: strings to blank out of the daemon's details (passwords, tokens).

    """
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details = (details_of() if callable(details_of) else None) or str(error)
    cls = _BY_CODE.get(code, ContainerdError)
    return cls(socket=socket, subject=subject, operation=operation, code=code.name,
               details=redact(details, secrets))


@contextmanager
def rpc_errors(*, socket: str, subject: str, operation: str,
               secrets: Iterable[str] = ()) -> Iterator[None]:
    """Turn a ``grpc.RpcError`` raised in the block into `from_rpc_error`'s exception.

    Works around ``await``: a plain ``with`` block may await, and the error surfaces here.
    The original error is kept as ``__cause__`` only when there are no secrets to hide (its
    text is the daemon's, unredacted).
    """
    secrets = tuple(secrets)
    try:
        yield
    except grpc.RpcError as error:
        mapped = from_rpc_error(error, socket=socket, subject=subject, operation=operation,
                                secrets=secrets)
        if any(secrets):
            raise mapped from None
        raise mapped from error
