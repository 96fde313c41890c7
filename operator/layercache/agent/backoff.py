"""Retry times of failed work items (layers, images): `layercache.backoff.RetryTimes`.

Kept as the agent's name for it; the policy itself lives with every other backoff in
`layercache.backoff`.
"""

from __future__ import annotations

from layercache.backoff import RetryTimes

__all__ = ["RetryTimes"]
