"""Retry times of failed work items (layers, images): exponential backoff per item.

A layer that failed is not tried again at once: the wait starts at ``initial`` seconds and
doubles with each further failure up to ``cap``, so a broken registry or peer is not hammered
while other layers proceed. A failure that says when to come back (a registry's
``Retry-After``) is not retried sooner, whatever the doubling or the cap say. A success
forgets the item's history.
"""

from __future__ import annotations

__all__ = ["RetryTimes"]


class RetryTimes:
    """When each failed item may be tried again: ``initial`` seconds, doubling up to ``cap``."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = cap
        self._next: dict[str, tuple[float, float]] = {}

    def failed(self, key: str, now: float, not_before: float | None = None) -> float:
        """Record a failure of ``key`` at ``now``; returns when it may be retried.

        ``not_before`` (seconds after ``now``, e.g. the server's ``Retry-After``) is the
        least wait, even beyond ``cap``; it does not change the doubling of later waits.
        """
        _, delay = self._next.get(key, (0.0, self.initial / 2))
        delay = min(self.cap, delay * 2)
        at = now + max(delay, not_before or 0.0)
        self._next[key] = (at, delay)
        return at

    def succeeded(self, key: str) -> None:
        """Forget ``key``'s failures."""
        self._next.pop(key, None)

    def ready(self, key: str, now: float) -> bool:
        """Whether ``key`` may be tried at ``now``."""
        entry = self._next.get(key)
        return entry is None or entry[0] <= now

    def earliest(self) -> float | None:
        """The earliest retry time recorded, if any."""
        return min((at for at, _ in self._next.values()), default=None)
