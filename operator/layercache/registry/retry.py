"""Retry policy for registry requests: which failures to retry, and how long to wait.

One budget per logical request (a manifest GET, a blob download with its resumes): the
client wraps the whole request in one `RetryPolicy.retrying()` loop and never nests them,
so attempts do not multiply. Decisions (STYLE.md habit 3, distribution's error semantics):

- retried: `TransientError` — connection errors, 5xx, 429, a body cut short;
- never retried: every other 4xx, auth failures (the client's single 401 token refresh is
  not a retry), bad manifests, digest mismatches.

The wait before attempt *n+1* is bounded exponential backoff with "equal jitter"
(half fixed, half random: ``b/2 + U(0, b/2)`` with ``b = min(max_backoff, initial·2ⁿ⁻¹)``:
`layercache.backoff.Backoff`),
and never less than the server's ``Retry-After`` (RFC 9110 §10.2.3: delay-seconds or an
HTTP-date). A ``Retry-After`` beyond ``max_retry_after`` ends the loop at once: waiting that
long belongs to the caller (a kopf handler re-queues; it does not sleep).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import tenacity

from layercache.backoff import Backoff
from layercache.registry.errors import TransientError, retry_after

__all__ = ["RetryPolicy", "parse_retry_after"]

log = logging.getLogger(__name__)

_DIGITS: Final = frozenset("0123456789")


def parse_retry_after(value: str | None, now: datetime.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or None when absent or malformed.

    Accepts delay-seconds (``"120"``: ASCII digits only, RFC 9110 §10.2.3) and an HTTP-date
    (IMF-fixdate ``Sun, 06 Nov 1994 08:49:37 GMT``, and the obsolete asctime form). A date
    in the past gives 0.0. ``now`` (aware, UTC) defaults to the current time.
    """
    if value is None:
        return None
    text = value.strip()
    if text and _DIGITS.issuperset(text):
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP-dates are always GMT
        when = when.replace(tzinfo=datetime.UTC)
    current = now or datetime.datetime.now(datetime.UTC)
    return max(0.0, (when - current).total_seconds())


Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    """How one registry request is retried.

    Attributes:
        attempts: attempts in all, the first included (>= 1).
        initial_backoff: backoff before the second attempt, seconds (before jitter).
        max_backoff: cap of the exponential backoff, seconds.
        max_retry_after: longest ``Retry-After`` (seconds) we wait out ourselves; a longer
            one ends the loop and the `RateLimitedError` propagates with it.
        sleep: how to wait (``asyncio.sleep``; tests pass a recorder).
        rng: jitter source.

    """

    attempts: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
    sleep: Sleep = field(default=asyncio.sleep, compare=False)
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")

    @staticmethod
    def is_retryable(error: BaseException) -> bool:
        """Whether ``error`` may go away on another attempt (a `TransientError`)."""
        return isinstance(error, TransientError)

    def backoff(self, attempt: int) -> float:
        """Jittered backoff (seconds) after failed attempt number ``attempt`` (1-based)."""
        return Backoff(self.initial_backoff, self.max_backoff, jitter=True,
                       rng=self.rng).delay(attempt)

    def wait_after(self, attempt: int, error: BaseException | None) -> float:
        """Seconds to wait after failed attempt ``attempt`` that raised ``error``.

        The jittered backoff, raised to the error's ``retry_after`` when it has one.
        """
        wait = self.backoff(attempt)
        server = retry_after(error)
        return wait if server is None else max(wait, server)

    def gives_up(self, attempt: int, error: BaseException | None) -> bool:
        """Whether to stop after failed attempt ``attempt``.

        True when the budget is spent or the ``Retry-After`` exceeds ``max_retry_after``.
        """
        if attempt >= self.attempts:
            return True
        server = retry_after(error)
        return server is not None and server > self.max_retry_after

    def retrying(self, what: str) -> tenacity.AsyncRetrying:
        """A tenacity loop for one request; ``what`` names it in log lines.

        Use as ``async for attempt in policy.retrying(...): with attempt: ...``. The last
        error is re-raised as is when the loop gives up.
        """

        def wait(state: tenacity.RetryCallState) -> float:
            return self.wait_after(state.attempt_number, _error(state))

        def stop(state: tenacity.RetryCallState) -> bool:
            return self.gives_up(state.attempt_number, _error(state))

        def before_sleep(state: tenacity.RetryCallState) -> None:
            seconds = state.next_action.sleep if state.next_action else 0.0
            log.info(
                "%s: attempt %d failed (%s); retrying in %.2f s",
                what,
                state.attempt_number,
                _error(state),
                seconds,
            )

        return tenacity.AsyncRetrying(
            stop=stop,
            wait=wait,
            retry=tenacity.retry_if_exception(self.is_retryable),
            reraise=True,
            sleep=self.sleep,
            before_sleep=before_sleep,
        )


def _error(state: tenacity.RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None
