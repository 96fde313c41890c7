"""Who is the active operator replica (layercache.leadership.is_active), as kopf decides."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from layercache.leadership import is_active

NOW = datetime.datetime(2026, 11, 29, 12, 0, tzinfo=datetime.UTC)


def _peer(priority: int, seen_seconds_ago: float, lifetime: int = 60) -> dict[str, Any]:
    seen = NOW - datetime.timedelta(seconds=seen_seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


@pytest.mark.parametrize(("peers", "expected"), [
    (None, True),                                             # no peering object yet
    ({}, True),
    ({"me": _peer(100, 1)}, True),                            # only ourselves
    ({"me": _peer(100, 1), "b": _peer(50, 1)}, True),         # we outrank a live peer
    ({"me": _peer(100, 1), "b": _peer(200, 1)}, False),       # a live peer outranks us
    ({"me": _peer(100, 1), "b": _peer(100, 1)}, False),       # equal: kopf pauses both
    ({"me": _peer(100, 1), "b": _peer(200, 61)}, True),       # higher but dead (lifetime 60)
    ({"me": _peer(100, 1), "b": _peer(200, 100, 120)}, False),  # its own lifetime counts
    ({"me": _peer(100, 1), "b": {"priority": 200}}, False),   # no lastseen: kopf says live
    ({"me": _peer(100, 1), "b": None}, True),                 # a peer being deleted
])
def test_active_unless_a_live_peer_has_equal_or_higher_priority(
        peers: dict[str, Any] | None, expected: bool) -> None:
    assert is_active(peers, "me", 100, NOW) is expected


def test_naive_timestamps_are_utc() -> None:
    seen = (NOW - datetime.timedelta(seconds=5)).replace(tzinfo=None).isoformat()
    assert not is_active({"b": {"priority": 200, "lifetime": 60, "lastseen": seen}}, "me", 1, NOW)
