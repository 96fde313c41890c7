"""One backoff policy for every retry loop of the operator, the agent and the clients.

The wait after failed attempt *n* (1-based) is ``b = min(cap, initial · factorⁿ⁻¹)``
seconds, with "equal jitter" when asked (half fixed, half random: ``b/2 + U(0, b/2)``, AWS
Architecture Blog, "Exponential Backoff And Jitter"): retries of many clients spread out,
yet each waits at least half its step. A success starts the sequence over.

Who uses it, with which numbers (each user names its own `Backoff`):

- `layercache.registry.retry.RetryPolicy`: registry requests, jittered (on tenacity);
- `RetryTimes`: per work item (a layer, an image) in the agent, unjittered;
- the agent's start-up calls and the watch of its own NodeLayerCache, 1 s to 30 s;
- the agent's peer polls (factor 1.5, jittered), containerd's ingest-lock wait (jittered);
- the operator's replan after a failure.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Backoff", "RetryTimes"]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``initial`` seconds, times ``factor`` per failure, up to ``cap``.

    ``jitter``: equal jitter (see the module docstring); ``rng`` its random source (tests
    pass a seeded one).

    Raises:
        ValueError: ``initial`` < 0, ``cap`` < ``initial`` or ``factor`` < 1.

    """

    initial: float
    cap: float
    factor: float = 2.0
    jitter: bool = False
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.initial < 0 or self.cap < self.initial or self.factor < 1:
            raise ValueError(f"need 0 <= initial ({self.initial}) <= cap ({self.cap}) "
                             f"and factor ({self.factor}) >= 1")

    def step(self, attempt: int) -> float:
        """The unjittered wait (seconds) after failed attempt ``attempt`` (1-based).

        Raises:
            ValueError: ``attempt`` < 1.

        """
        if attempt < 1:
            raise ValueError(f"attempt {attempt} < 1")
        return float(min(self.cap, self.initial * self.factor ** (attempt - 1)))

    def delay(self, attempt: int) -> float:
        """The wait (seconds) after failed attempt ``attempt`` (1-based), jittered if asked."""
        base = self.step(attempt)
        return base / 2 + self.rng.uniform(0.0, base / 2) if self.jitter else base

    def delays(self) -> Iterator[float]:
        """The waits after attempts 1, 2, 3, … (endless): one loop's retries."""
        attempt = 1
        while True:
            yield self.delay(attempt)
            attempt += 1


class RetryTimes:
    """When each failed work item may be tried again: a `Backoff` per item, no jitter.

    A failed item is not tried again at once: the wait starts at ``initial`` seconds and
    doubles with each further failure up to ``cap``, so a broken registry or peer is not
    hammered while other items proceed. A failure that says when to come back (a registry's
    ``Retry-After``) is not retried sooner, whatever the doubling or the cap say. A success
    forgets the item's history. Times are the caller's clock, in seconds.
    """

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = cap
        self.backoff = Backoff(min(initial, cap), cap)  # a cap below initial: cap, as ever
        # key -> (earliest retry time, failures so far)
        self._next: dict[str, tuple[float, int]] = {}

    def failed(self, key: str, now: float, not_before: float | None = None) -> float:
        """Record a failure of ``key`` at ``now``; returns when it may be retried.

        ``not_before`` (seconds after ``now``, e.g. the server's ``Retry-After``) is the
        least wait, even beyond ``cap``; it does not change the doubling of later waits.
        """
        failures = self._next.get(key, (0.0, 0))[1] + 1
        at = now + max(self.backoff.delay(failures), not_before or 0.0)
        self._next[key] = (at, failures)
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
