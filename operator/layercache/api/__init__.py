"""The contract between operator and agent: both CRDs as typed models, named once.

``layercache.dev/v1alpha1`` has two kinds (manifests/crds/):

- ``LayerCache`` (namespaced): users write ``spec`` (`layercache.api.spec.parse_spec` checks
  it into a `layercache.api.spec.CacheSpec`); the operator writes ``status``
  (`LayerCacheStatus`).
- ``NodeLayerCache`` (cluster-scoped, named after its node): the operator writes ``spec``
  (`NodeLayerCacheSpec`), that node's agent writes ``status`` (`NodeLayerCacheStatus`).

Every read and write of these objects goes through the models here: ``from_dict`` at the
edge where a dict comes from the apiserver, ``to_dict`` where one goes to it. Python
attributes are snake_case, the wire is camelCase exactly as the CRDs name it. The status
reasons both processes write are one enum (`layercache.api.reasons.Reason`).
"""

from __future__ import annotations

from typing import Final

from layercache.api.layercache import LayerCacheStatus
from layercache.api.model import Condition, InvalidObjectError
from layercache.api.nodelayercache import (
    InvalidNodeSpecError,
    NodeLayerCache,
    NodeLayerCacheSpec,
    NodeLayerCacheStatus,
)
from layercache.api.reasons import Reason, failure_reason

__all__ = [
    "API_VERSION",
    "GROUP",
    "LC_KIND",
    "LC_PLURAL",
    "NLC_KIND",
    "NLC_PLURAL",
    "VERSION",
    "Condition",
    "InvalidNodeSpecError",
    "InvalidObjectError",
    "LayerCacheStatus",
    "NodeLayerCache",
    "NodeLayerCacheSpec",
    "NodeLayerCacheStatus",
    "Reason",
    "failure_reason",
]

#: The API group of both CRDs.
GROUP: Final = "layercache.dev"
#: The one served and stored version.
VERSION: Final = "v1alpha1"
#: ``apiVersion`` of both kinds.
API_VERSION: Final = f"{GROUP}/{VERSION}"
LC_KIND: Final = "LayerCache"
LC_PLURAL: Final = "layercaches"
NLC_KIND: Final = "NodeLayerCache"
NLC_PLURAL: Final = "nodelayercaches"
