"""`relay.core.pauses.pause_for` as a specification: how long a mailbox rests after a limit."""

from __future__ import annotations

import pytest

from relay.core.pauses import pause_for

SENDING = "ErrorExceededMessageLimit"


@pytest.mark.parametrize(
    ("limit", "retry_after", "expected"),
    [
        pytest.param(SENDING, 7.0, 7.0, id="sending-limit"),
        pytest.param("MailboxConcurrency", 0.5, 0.5, id="concurrency"),
        pytest.param(SENDING, 86_400.0, 86_400.0, id="a-day"),
        pytest.param(SENDING, 10_000_000.0, 86_400.0, id="capped-at-a-day"),
    ],
)
def test_retry_after_wins_over_the_learned_back_off(
    limit: str, retry_after: float, expected: float
) -> None:
    """Graph's Retry-After is the fastest recovery; past a day it is a server's mistake."""
    assert pause_for(limit, retry_after, streak=5) == expected


@pytest.mark.parametrize(
    ("limit", "streak", "expected"),
    [
        pytest.param("MailboxConcurrency", 0, 1.0, id="concurrency-first"),
        pytest.param("CommandConcurrencyLimitReached", 1, 2.0, id="command-concurrency-second"),
        pytest.param("MailboxConcurrency", 5, 32.0, id="concurrency-doubles"),
        pytest.param("MailboxConcurrency", 6, 60.0, id="concurrency-capped-at-a-minute"),
        pytest.param(SENDING, 0, 60.0, id="sending-first"),
        pytest.param("SubmissionQuotaExceeded", 1, 120.0, id="quota-second"),
        pytest.param("TooManyRequests", 5, 1920.0, id="sending-doubles"),
        pytest.param(SENDING, 6, 3600.0, id="sending-capped-at-an-hour"),
        pytest.param(SENDING, 10_000, 3600.0, id="a-long-streak-stays-capped"),
    ],
)
def test_without_retry_after_the_pause_doubles_per_pause_in_a_row(
    limit: str, streak: int, expected: float
) -> None:
    """Concurrency answers start at 1 s (a request in flight ends soon) and stop at 60 s;
    sending limits start at a minute and stop at an hour."""
    assert pause_for(limit, None, streak) == expected


@pytest.mark.parametrize("retry_after", [0.0, -3.0])
def test_a_retry_after_of_zero_or_less_is_ignored(retry_after: float) -> None:
    """Retry-After 0 would pause for nothing and retry at once: the back-off applies."""
    assert pause_for(SENDING, retry_after, streak=0) == 60.0
