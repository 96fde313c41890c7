"""What a process learned about each registry host, shared by every `RegistryClient` in it.

The operator opens a client per resolution (each cache has its own pull secrets) and the
agent one for its life; either way, per registry host (`Reference.registry`), there is one
`HostState` in the process's `RegistryHosts`:

- the rate limit: a ``429 Too Many Requests`` blocks the host until its ``Retry-After``
  (RFC 6585 §4, RFC 9110 §10.2.3) for every request of every caller, not just the one that
  was refused. A caller that would have to wait longer than it is willing to (its
  `RetryPolicy.max_retry_after`) gets `RateLimitedError` at once, carrying the time left,
  and sends nothing; the others wait. When the block ends, one request goes first (the
  probe) and the rest follow only once it was not refused again: a rate-limited registry
  sees one waiting client, not one per resolution or layer;
- the concurrency bound: `RegistryOptions.max_concurrency` requests at once;
- whether ``HEAD`` on manifests works there (`head_supported`): some registries answer it
  405, 501 or another error although they serve ``GET``. Remembered for
  `HEAD_RETRY_SECONDS`, then tried again (the registry may have been fixed);
- a hook, ``on_response(host, code)``, called for every HTTP answer (``code`` the status
  as text) and every request that got none (``code`` ``"error"``): the request counter
  ``layercache_registry_requests_total``.

Times are `time.monotonic` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from layercache.registry.errors import RateLimitedError

__all__ = ["HEAD_RETRY_SECONDS", "HostState", "RegistryHosts"]

log = logging.getLogger(__name__)

#: Seconds a host whose manifests refused ``HEAD`` is asked with ``GET`` only.
HEAD_RETRY_SECONDS: Final = 3600.0

#: Called with (registry host, status code as text or ``"error"``) for each request.
OnResponse = Callable[[str, str], None]
#: Called with a response's status and its ``Retry-After`` (seconds or None).
Answered = Callable[[int, float | None], None]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class HostState:
    """One registry host's limiter and what we learned of it (see the module docstring)."""

    def __init__(self, host: str, max_concurrency: int, *, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self.host = host
        self.blocked_until = 0.0
        #: True from a 429 until a request is answered with anything else.
        self.limited = False
        self.head_refused_until = 0.0
        self._slots = asyncio.Semaphore(max_concurrency)
        self._probe = asyncio.Lock()
        self._clock = clock
        self._sleep = sleep

    def blocked_for(self) -> float:
        """Seconds until the host's rate-limit block ends (0.0 when not blocked)."""
        return max(0.0, self.blocked_until - self._clock())

    @contextlib.asynccontextmanager
    async def slot(self, what: str, max_wait: float) -> AsyncIterator[Answered]:
        """Hold a request slot for ``what``; yields ``answered(status, retry_after)``.

        Waits out a rate-limit block of at most ``max_wait`` seconds, then, if the host was
        refused with 429 and has not answered otherwise since, waits to be the one probe.
        The block must call ``answered`` with the response's status and ``Retry-After``
        (seconds or None) as soon as it has them; that releases the probe's turn.

        Raises:
            RateLimitedError: the block lasts longer than ``max_wait`` (nothing was sent;
                ``retry_after`` is the time left).

        """
        probing = await self._admit(what, max_wait)
        done = False

        def answered(status: int, retry_after: float | None) -> None:
            nonlocal done
            if done:
                return
            done = True
            if status == 429:
                self.limited = True
                until = self._clock() + (retry_after or 0.0)
                if until > self.blocked_until:
                    self.blocked_until = until
                    log.warning("registry %s rate-limits us: no request before %.0f s",
                                self.host, retry_after or 0.0)
            else:
                self.limited = False
            if probing:
                self._probe.release()

        try:
            async with self._slots:
                yield answered
        finally:
            if not done and probing:  # no answer (connection failed): let the next one try
                done = True
                self._probe.release()

    async def _admit(self, what: str, max_wait: float) -> bool:
        """Wait until a request may go; True when it goes as the probe (lock held)."""
        while True:
            wait = self.blocked_for()
            if wait > max_wait:
                raise RateLimitedError(f"{what} (not sent: {self.host} rate-limits us)", wait)
            if wait > 0:
                await self._sleep(wait)
                continue
            if not self.limited:
                return False
            await self._probe.acquire()
            if self.limited and self.blocked_for() <= 0:
                return True
            self._probe.release()  # another probe answered meanwhile: look again

    def head_supported(self) -> bool:
        """Whether to try ``HEAD`` on this host's manifests."""
        return self._clock() >= self.head_refused_until

    def head_refused(self, status: int) -> None:
        """``HEAD`` on a manifest got ``status`` (405, 501 …): use ``GET`` for a while."""
        if self.head_supported():
            log.info("registry %s answers HEAD on manifests with HTTP %d: using GET for %.0f s",
                     self.host, status, HEAD_RETRY_SECONDS)
        self.head_refused_until = self._clock() + HEAD_RETRY_SECONDS


class RegistryHosts:
    """Every registry host's `HostState` in this process; pass one to each `RegistryClient`.

    ``on_response(host, code)`` is called for every request (see the module docstring).
    ``clock`` and ``sleep`` are for tests.
    """

    def __init__(self, on_response: OnResponse | None = None, *,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self._hosts: dict[str, HostState] = {}
        self._on_response = on_response
        self._clock = clock
        self._sleep = sleep

    def get(self, host: str, max_concurrency: int = 8) -> HostState:
        """The state of ``host``; ``max_concurrency`` applies when it is first seen."""
        state = self._hosts.get(host)
        if state is None:
            state = HostState(host, max_concurrency, clock=self._clock, sleep=self._sleep)
            self._hosts[host] = state
        return state

    def count(self, host: str, code: int | str) -> None:
        """Report one request to ``host`` answered ``code`` (or ``"error"``)."""
        if self._on_response is not None:
            self._on_response(host, str(code))
