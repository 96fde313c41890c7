"""layercache.backoff: the one backoff policy, and RetryTimes on it."""

from __future__ import annotations

import itertools
import random

import pytest

from layercache.backoff import Backoff, RetryTimes


def test_steps_grow_by_factor_up_to_the_cap() -> None:
    assert [Backoff(1.0, 30.0).step(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert list(itertools.islice(Backoff(1.0, 30.0).delays(), 7)) == [1, 2, 4, 8, 16, 30, 30]
    assert [Backoff(2.0, 5.0, factor=1.5).step(n) for n in (1, 2, 3, 4)] == [2.0, 3.0, 4.5, 5.0]


def test_equal_jitter_stays_in_the_upper_half_of_each_step() -> None:
    policy = Backoff(0.05, 1.0, jitter=True, rng=random.Random(7))  # noqa: S311 - jitter
    for attempt in range(1, 10):
        base = policy.step(attempt)
        waits = [policy.delay(attempt) for _ in range(200)]
        assert all(base / 2 <= w <= base for w in waits)
        assert max(waits) - min(waits) > base / 4  # really spread, not one value


def test_same_seed_same_waits() -> None:
    def waits() -> list[float]:
        policy = Backoff(1.0, 8.0, jitter=True, rng=random.Random(3))  # noqa: S311 - jitter
        return list(itertools.islice(policy.delays(), 5))

    assert waits() == waits()


@pytest.mark.parametrize(("initial", "cap", "factor"), [(-1, 1, 2), (2, 1, 2), (1, 2, 0.5)])
def test_bad_policies_are_refused(initial: float, cap: float, factor: float) -> None:
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial, cap, factor)


def test_attempts_count_from_one() -> None:
    with pytest.raises(ValueError, match="attempt 0"):
        Backoff(1, 2).delay(0)


def test_retry_times_double_per_item_and_forget_on_success() -> None:
    times = RetryTimes(initial=1.0, cap=4.0)
    assert [times.failed("a", 0.0) for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]
    assert times.failed("b", 10.0) == 11.0  # items are apart
    times.succeeded("a")
    assert times.ready("a", 0.0)
    assert times.failed("a", 0.0) == 1.0  # started over
    assert times.earliest() == 1.0


def test_retry_times_cap_below_initial_is_the_wait() -> None:
    assert RetryTimes(initial=10.0, cap=3.0).failed("x", 0.0) == 3.0
