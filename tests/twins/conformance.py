"""Each twin is its port, as mypy sees it: `make lint` fails when a port and its twin drift.

Nothing here runs in tests; mypy (strict, ``packages`` in pyproject.toml includes ``twins``)
checks that every twin is structurally the Protocol the product's loops depend on, and the
real classes are checked where the product assigns them.
"""

from __future__ import annotations

from layercache.agent.ports import AgentKubePort, PeerSource
from layercache.containerd.ports import ContentStorePort, CRIImagesPort, LeasesPort
from layercache.controller.ports import ImageRegistry, KubePort
from twins.agent_kube import AgentKubeTwin
from twins.content_store import ContentStoreTwin, CRIImagesTwin, LeasesTwin
from twins.operator_kube import KubeTwin, RegistryTwin
from twins.sources import PeersTwin


def operator_kube(twin: KubeTwin) -> KubePort:
    return twin


def operator_registry(twin: RegistryTwin) -> ImageRegistry:
    return twin


def agent_kube(twin: AgentKubeTwin) -> AgentKubePort:
    return twin


def content_store(twin: ContentStoreTwin) -> ContentStorePort:
    return twin


def leases(twin: LeasesTwin) -> LeasesPort:
    return twin


def cri_images(twin: CRIImagesTwin) -> CRIImagesPort:
    return twin


def peers(twin: PeersTwin) -> PeerSource:
    return twin
