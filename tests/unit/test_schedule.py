"""Retry timing as a table: Retry-After wins, otherwise capped exponential backoff with jitter,
never past the message's lifetime."""

from __future__ import annotations

import pytest

from relay.core.schedule import Backoff, is_expired, next_attempt_at

BACKOFF = Backoff(first=60.0, max=3600.0, lifetime=5 * 86400.0)


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [(1, 60.0), (2, 120.0), (3, 240.0), (6, 1920.0), (7, 3600.0), (50, 3600.0), (10_000, 3600.0)],
)
def test_backoff_doubles_from_first_and_is_capped_at_max(attempts: int, expected: float) -> None:
    """Without jitter the delay is first * 2^(n-1), never more than max."""
    assert BACKOFF.delay(attempts, random_fraction=0.0) == expected


def test_jitter_adds_at_most_a_quarter_and_never_passes_max() -> None:
    """Jitter spreads retries of messages deferred together, within [d, 1.25 d] and <= max."""
    assert BACKOFF.delay(1, random_fraction=1.0) == 75.0
    assert BACKOFF.delay(7, random_fraction=1.0) == 3600.0


def test_retry_after_is_honoured_exactly() -> None:
    """Graph's Retry-After decides, even when the backoff would say otherwise."""
    at = next_attempt_at(
        now=1000.0, created=900.0, attempts=5, retry_after=3.0, backoff=BACKOFF, random_fraction=0.5
    )
    assert at == 1003.0


def test_the_last_try_is_scheduled_at_the_lifetime_deadline() -> None:
    """A backoff reaching past created + lifetime is cut to the deadline."""
    short = Backoff(first=60.0, max=3600.0, lifetime=100.0)
    at = next_attempt_at(
        now=50.0, created=0.0, attempts=3, retry_after=None, backoff=short, random_fraction=0.0
    )
    assert at == 100.0


@pytest.mark.parametrize(("age", "expired"), [(0.0, False), (99.9, False), (100.0, True)])
def test_expiry_is_age_at_least_lifetime(age: float, expired: bool) -> None:
    """A message is expired once it has been queued for `lifetime` seconds."""
    assert is_expired(created=1000.0, now=1000.0 + age, lifetime=100.0) is expired
