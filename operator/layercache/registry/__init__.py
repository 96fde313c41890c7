"""OCI distribution client: auth, manifests, blobs, retries, and image resolution.

Modules, one concern each: `errors` (classified errors), `mediatypes`, `challenge`
(``WWW-Authenticate``), `credentials` (Docker config / pull secrets), `auth` (basic and
bearer-token flows, token cache), `retry` (policy on tenacity), `manifest` (parsing at the
edge), `hosts` (per-host rate limit, HEAD support and request counts, shared by clients),
`client` (connections, auth, redirects), `fetch` (manifests), `blobs` (verified streaming
with resume), `resolve` (reference + platform → `ResolvedImage`).
"""

from layercache.registry.blobs import (
    BlobSink,
    CallbackSink,
    FileSink,
    MemorySink,
    fetch_blob,
    fetch_blob_bytes,
)
from layercache.registry.client import RegistryClient, RegistryOptions
from layercache.registry.credentials import Credentials, DockerConfig, Keyring
from layercache.registry.errors import (
    AccessDeniedError,
    AuthenticationError,
    BlobNotFoundError,
    BlobTooLargeError,
    DigestMismatchError,
    IncompleteBodyError,
    ManifestError,
    ManifestNotFoundError,
    NoMatchingPlatformError,
    NonDistributableLayerError,
    RateLimitedError,
    RegistryAuthError,
    RegistryConfigError,
    RegistryConnectionError,
    RegistryDigestMismatchError,
    RegistryError,
    RegistryStatusError,
    ServerError,
    TransientError,
    UnsupportedCredentialsError,
    UnsupportedDigestError,
    UnsupportedManifestError,
    UnsupportedMediaTypeError,
    retry_after,
)
from layercache.registry.fetch import FetchedManifest, ManifestHead, get_manifest, head_manifest
from layercache.registry.hosts import HostState, RegistryHosts
from layercache.registry.resolve import ResolvedImage, resolve
from layercache.registry.retry import RetryPolicy

__all__ = [
    "AccessDeniedError",
    "AuthenticationError",
    "BlobNotFoundError",
    "BlobSink",
    "BlobTooLargeError",
    "CallbackSink",
    "Credentials",
    "DigestMismatchError",
    "DockerConfig",
    "FetchedManifest",
    "FileSink",
    "HostState",
    "IncompleteBodyError",
    "Keyring",
    "ManifestError",
    "ManifestHead",
    "ManifestNotFoundError",
    "MemorySink",
    "NoMatchingPlatformError",
    "NonDistributableLayerError",
    "RateLimitedError",
    "RegistryAuthError",
    "RegistryClient",
    "RegistryConfigError",
    "RegistryConnectionError",
    "RegistryDigestMismatchError",
    "RegistryError",
    "RegistryHosts",
    "RegistryOptions",
    "RegistryStatusError",
    "ResolvedImage",
    "RetryPolicy",
    "ServerError",
    "TransientError",
    "UnsupportedCredentialsError",
    "UnsupportedDigestError",
    "UnsupportedManifestError",
    "UnsupportedMediaTypeError",
    "fetch_blob",
    "fetch_blob_bytes",
    "get_manifest",
    "head_manifest",
    "resolve",
    "retry_after",
]
