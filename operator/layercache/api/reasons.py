"""Every CamelCase reason layercache writes into a status, and exception → reason, once.

The reasons are public API: they appear in ``status.conditions[].reason``,
``status.reason``, ``status.nodes.failing[].reason``, ``status.images[].error``,
``status.errors[].reason`` and the ``reason`` label of
``layercache_agent_errors_total`` / ``layercache_operator_resolve_errors_total``, and
people alert on them. So they are an enum, and an exception's reason comes from one
explicit table (`failure_reason`), never from a class name: renaming an exception class
must not change the API.

A failure has one reason per place it is reported, and the two places name it from
their own point of view:

- resolving a LayerCache's images (the operator, ``status.images[].error`` and the
  conditions): the registry is the only party, so ``RateLimited``, ``ManifestNotFound``;
- fetching a NodeLayerCache's layers (the agent, ``status.errors``): a layer comes from
  a peer or from upstream, so the reason says which: ``UpstreamRateLimited``,
  ``PeerUnavailable``.

Both columns live in one table (`_FAILURES`), keyed by exception class name so that this
module imports no client (the API models sit below the registry, containerd and agent
code); a unit test (tests/unit/test_api.py) checks that every name is an exception class
the code defines, so a renamed class fails a test rather than changing a reason.
"""

from __future__ import annotations

from enum import StrEnum, unique
from typing import Final, Literal

__all__ = ["FAILURE_CLASSES", "Reason", "Where", "failure_reason"]


@unique
class Reason(StrEnum):
    """The reasons, grouped by where they appear. Values are the wire strings."""

    # -- conditions, both kinds -------------------------------------------------------
    #: Degraded is False.
    AS_EXPECTED = "AsExpected"
    #: A spec field is unusable (Ready, Progressing and Degraded of a LayerCache; the
    #: agent's Degraded for its NodeLayerCache spec).
    INVALID_SPEC = "InvalidSpec"
    #: Progressing is False: nothing left to do.
    COMPLETE = "Complete"
    #: Progressing is True: layers are being fetched (also a node's default failing reason).
    FETCHING = "Fetching"
    # -- LayerCache conditions (the operator) --------------------------------------------
    ALL_NODES_READY = "AllNodesReady"
    NODES_NOT_READY = "NodesNotReady"
    IMAGES_UNRESOLVED = "ImagesUnresolved"
    #: Progressing: not planned yet.
    PLANNING = "Planning"
    NO_MATCHING_NODES = "NoMatchingNodes"
    BUDGET_EXCEEDED = "BudgetExceeded"
    #: Degraded: some nodes report failures (``status.nodes.failing``).
    NODE_ERRORS = "NodeErrors"
    # -- LayerCache status.nodes.failing[] ----------------------------------------------
    NODE_CACHE_MISSING = "NodeCacheMissing"
    AGENT_NOT_CAUGHT_UP = "AgentNotCaughtUp"
    #: A node's Ready condition is True.
    READY = "Ready"
    #: A node's Degraded condition is True with no reason.
    DEGRADED = "Degraded"
    # -- LayerCache images and pull Secrets -----------------------------------------------
    INVALID_REFERENCE = "InvalidReference"
    PULL_SECRET_MISSING = "PullSecretMissing"  # noqa: S105 (a reason, not a secret)
    PULL_SECRET_INVALID = "PullSecretInvalid"  # noqa: S105 (a reason, not a secret)
    # -- resolving an image (the operator; `failure_reason(..., "resolve")`) -------------
    REGISTRY = "Registry"
    REGISTRY_CONFIG = "RegistryConfig"
    REGISTRY_STATUS = "RegistryStatus"
    MANIFEST_NOT_FOUND = "ManifestNotFound"
    BLOB_NOT_FOUND = "BlobNotFound"
    TRANSIENT = "Transient"
    REGISTRY_CONNECTION = "RegistryConnection"
    SERVER = "Server"
    RATE_LIMITED = "RateLimited"
    INCOMPLETE_BODY = "IncompleteBody"
    REGISTRY_AUTH = "RegistryAuth"
    AUTHENTICATION = "Authentication"
    ACCESS_DENIED = "AccessDenied"
    UNSUPPORTED_CREDENTIALS = "UnsupportedCredentials"
    MANIFEST = "Manifest"
    UNSUPPORTED_MANIFEST = "UnsupportedManifest"
    UNSUPPORTED_MEDIA_TYPE = "UnsupportedMediaType"
    UNSUPPORTED_DIGEST = "UnsupportedDigest"
    BLOB_TOO_LARGE = "BlobTooLarge"
    NON_DISTRIBUTABLE_LAYER = "NonDistributableLayer"
    NO_MATCHING_PLATFORM = "NoMatchingPlatform"
    # -- NodeLayerCache conditions (the agent) ------------------------------------------
    ALL_LAYERS_HELD = "AllLayersHeld"
    LAYERS_MISSING = "LayersMissing"
    IMAGES_PENDING = "ImagesPending"
    CHAINS_PENDING = "ChainsPending"
    PAUSED = "Paused"
    WAITING_TO_RETRY = "WaitingToRetry"
    # -- disk (the agent: Progressing False and Degraded True while fetching is refused) ---
    DISK_PRESSURE = "DiskPressure"
    NODE_DISK_PRESSURE = "NodeDiskPressure"
    IMAGE_FS_UNKNOWN = "ImageFsUnknown"
    # -- fetching a layer (the agent; `failure_reason(..., "fetch")`) --------------------
    DIGEST_MISMATCH = "DigestMismatch"
    SIZE_MISMATCH = "SizeMismatch"
    RESUME_REFUSED = "ResumeRefused"
    PEER_UNAUTHORIZED = "PeerUnauthorized"
    PEER_UNAVAILABLE = "PeerUnavailable"
    NON_DISTRIBUTABLE = "NonDistributable"
    UPSTREAM_NOT_FOUND = "UpstreamNotFound"
    UPSTREAM_UNAUTHORIZED = "UpstreamUnauthorized"
    UPSTREAM_RATE_LIMITED = "UpstreamRateLimited"
    UPSTREAM_UNAVAILABLE = "UpstreamUnavailable"
    UPSTREAM_REFUSED = "UpstreamRefused"
    UPSTREAM_ERROR = "UpstreamError"
    CONTAINERD_UNAVAILABLE = "ContainerdUnavailable"
    CONTAINERD_ERROR = "ContainerdError"
    #: An exception no row of the table names (a bug): the agent's fallback.
    INTERNAL_ERROR = "InternalError"
    # -- images, chains and Secrets on a node (the agent) ---------------------------------
    IMAGE_PULL_FAILED = "ImagePullFailed"
    IMAGE_RESOLVE_FAILED = "ImageResolveFailed"
    DIFF_ID_MISMATCH = "DiffIDMismatch"
    UNPACK_FAILED = "UnpackFailed"
    UNSUPPORTED_SNAPSHOTTER = "UnsupportedSnapshotter"
    PEER_TOKEN_MISSING = "PeerTokenMissing"  # noqa: S105 (a reason, not a secret)
    PEER_TOKEN_UNREADABLE = "PeerTokenUnreadable"  # noqa: S105 (a reason, not a secret)
    PEER_TOKEN_INVALID = "PeerTokenInvalid"  # noqa: S105 (a reason, not a secret)
    CREDENTIALS_UNREADABLE = "CredentialsUnreadable"
    CREDENTIALS_INVALID = "CredentialsInvalid"


#: Where a failure is reported: resolving a LayerCache's images, or fetching a layer.
Where = Literal["resolve", "fetch"]

R = Reason
#: Exception class name → (its reason when resolving, its reason when fetching); None:
#: that side has no row for the class, and its nearest base class with one decides.
#: ``DigestMismatchError`` names the classes of layercache.oci.digest and
#: layercache.registry.errors both (the second subclasses the first).
_FAILURES: Final[dict[str, tuple[Reason | None, Reason | None]]] = {
    "DigestMismatchError": (R.DIGEST_MISMATCH, R.DIGEST_MISMATCH),
    "SourceSizeError": (None, R.SIZE_MISMATCH),
    "ResumeRefusedError": (None, R.RESUME_REFUSED),
    "PeerUnauthorizedError": (None, R.PEER_UNAUTHORIZED),
    "PeerError": (None, R.PEER_UNAVAILABLE),
    "NonDistributableLayerError": (R.NON_DISTRIBUTABLE_LAYER, R.NON_DISTRIBUTABLE),
    "BlobNotFoundError": (R.BLOB_NOT_FOUND, R.UPSTREAM_NOT_FOUND),
    "ManifestNotFoundError": (R.MANIFEST_NOT_FOUND, None),
    "RegistryAuthError": (R.REGISTRY_AUTH, R.UPSTREAM_UNAUTHORIZED),
    "AuthenticationError": (R.AUTHENTICATION, None),
    "AccessDeniedError": (R.ACCESS_DENIED, None),
    "UnsupportedCredentialsError": (R.UNSUPPORTED_CREDENTIALS, None),
    "RateLimitedError": (R.RATE_LIMITED, R.UPSTREAM_RATE_LIMITED),
    "TransientError": (R.TRANSIENT, R.UPSTREAM_UNAVAILABLE),
    "RegistryConnectionError": (R.REGISTRY_CONNECTION, None),
    "ServerError": (R.SERVER, None),
    "IncompleteBodyError": (R.INCOMPLETE_BODY, None),
    "RegistryStatusError": (R.REGISTRY_STATUS, R.UPSTREAM_REFUSED),
    "RegistryConfigError": (R.REGISTRY_CONFIG, None),
    "ManifestError": (R.MANIFEST, None),
    "UnsupportedManifestError": (R.UNSUPPORTED_MANIFEST, None),
    "UnsupportedMediaTypeError": (R.UNSUPPORTED_MEDIA_TYPE, None),
    "UnsupportedDigestError": (R.UNSUPPORTED_DIGEST, None),
    "BlobTooLargeError": (R.BLOB_TOO_LARGE, None),
    "NoMatchingPlatformError": (R.NO_MATCHING_PLATFORM, None),
    "RegistryError": (R.REGISTRY, R.UPSTREAM_ERROR),
    "Unavailable": (None, R.CONTAINERD_UNAVAILABLE),
    "ContainerdError": (None, R.CONTAINERD_ERROR),
}
#: The exception class names `failure_reason` knows (a unit test checks each exists).
FAILURE_CLASSES: Final = frozenset(_FAILURES)


def failure_reason(error: BaseException, where: Where) -> Reason | str:
    """The reason to report ``error`` with, ``where`` it happened.

    The most specific class of ``error`` (its MRO, in order) with a row for ``where``
    decides. A ``DiskPressureError`` carries its own reason (``DiskPressure``,
    ``NodeDiskPressure``, ``ImageFsUnknown``). No row: `Reason.REGISTRY` when resolving,
    `Reason.INTERNAL_ERROR` when fetching.
    """
    column = 0 if where == "resolve" else 1
    for kind in type(error).__mro__:
        if kind.__name__ == "DiskPressureError":
            return str(getattr(error, "reason", R.DISK_PRESSURE))
        row = _FAILURES.get(kind.__name__)
        if row is not None and row[column] is not None:
            return row[column]  # type: ignore[return-value]
    return R.REGISTRY if where == "resolve" else R.INTERNAL_ERROR
