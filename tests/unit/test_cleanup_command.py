"""`layercache cleanup`: when a node has released its layers, and the bounded wait.

layercache.cli.uninstall.not_released on raw objects; layercache.cli.uninstall.cleanup on a scripted
API (pure logic: the real one runs in tests/integration/test_uninstall.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from layercache.cli.uninstall import CleanupTimeout, cleanup, not_released


def _node(generation: int, layers: int, observed: int | None, held: int | None
          ) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if observed is not None:
        status = {"observedGeneration": observed, "layers": {"held": held, "wanted": layers}}
    return {"metadata": {"generation": generation},
            "spec": {"layers": [{"digest": f"sha256:{i}"} for i in range(layers)]},
            "status": status}


@pytest.mark.parametrize(("node", "left"), [
    (_node(3, 0, 3, 0), None),                                       # released
    (_node(3, 2, 3, 2), "still wants 2 layers"),                      # spec not emptied yet
    (_node(4, 0, 3, 2), "no agent report on generation 4 yet (observed 3)"),  # agent behind
    (_node(4, 0, None, None), "no agent report on generation 4 yet (observed None)"),
    (_node(4, 0, 4, 1), "the agent still holds 1 layers"),
])
def test_a_node_is_released_when_its_agent_reported_an_empty_spec(
        node: dict[str, Any], left: str | None) -> None:
    found = not_released([], {"n1": node})
    if left is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith("node n1: ") and left in found[0]


def test_caches_still_present_are_named_with_their_finalizers() -> None:
    caches = [{"metadata": {"namespace": "a", "name": "x", "deletionTimestamp": "t",
                            "finalizers": ["layercache.dev/finalizer"]}},
              {"metadata": {"namespace": "b", "name": "y"}}]
    assert not_released(caches, {}) == [
        "LayerCache a/x (deleting, finalizers layercache.dev/finalizer)",
        "LayerCache b/y (not deleted)"]


class _Scripted:
    """LayerCaches that go once deleted, and one node that releases after `after` polls."""

    def __init__(self, after: int) -> None:
        self.caches = [{"metadata": {"namespace": "ns", "name": "c"}}]
        self.deleted: list[str] = []
        self.polls, self.after = 0, after

    def layer_caches(self) -> list[dict[str, Any]]:
        return [c for c in self.caches if c["metadata"]["name"] not in self.deleted]

    def delete_layer_cache(self, namespace: str, name: str) -> None:
        self.deleted.append(name)

    def node_layer_caches(self) -> dict[str, dict[str, Any]]:
        self.polls += 1
        return {"n1": _node(2, 0, 2, 0 if self.polls > self.after else 5)}


def test_cleanup_deletes_every_cache_and_returns_once_released() -> None:
    api, now = _Scripted(after=3), [0.0]
    cleanup(api, 60, poll=2, log=lambda _: None, clock=lambda: now[0],  # type: ignore[arg-type]
            sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert api.deleted == ["c"]
    assert api.polls == 4 and now[0] == 6


def test_cleanup_fails_at_its_deadline_naming_what_is_held() -> None:
    api, now = _Scripted(after=1000), [0.0]
    with pytest.raises(CleanupTimeout, match=r"after 10 s.*\n  node n1: the agent still holds 5"):
        cleanup(api, 10, poll=2, log=lambda _: None,  # type: ignore[arg-type]
                clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert now[0] == 10
