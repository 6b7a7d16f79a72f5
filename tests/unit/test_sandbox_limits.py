"""The sandbox's limits as values: validation and the rolling window's arithmetic."""

from __future__ import annotations

import pytest

from relay.sandbox.limits import RollingWindow, SandboxLimits, replace_limits
from relay.sandbox.mail_index import recipients_by_field


def test_an_event_that_fits_waits_zero() -> None:
    window = RollingWindow()
    window.add(100.0, 2)
    assert window.wait(100.0, 1, limit=3, window=60) == 0.0


def test_an_event_over_the_limit_waits_until_enough_has_left_the_window() -> None:
    window = RollingWindow()
    window.add(100.0, 2)
    window.add(110.0, 1)
    assert window.wait(120.0, 1, limit=3, window=60) == 40.0  # the first leaves at 160
    assert window.wait(120.0, 3, limit=3, window=60) == 50.0  # both must leave: 170


def test_an_event_exactly_one_window_old_is_out_of_it() -> None:
    """The window is (now - W, now]."""
    window = RollingWindow()
    window.add(100.0, 1)
    assert window.wait(159.999, 1, limit=1, window=60) > 0
    assert window.wait(160.0, 1, limit=1, window=60) == 0.0


def test_an_event_bigger_than_the_limit_never_fits() -> None:
    assert RollingWindow().wait(0.0, 5, limit=4, window=300) == 300


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"messages_per_minute": 0}, "messages_per_minute must be a whole number of at least 1"),
        ({"recipients_per_day": 2.5}, "recipients_per_day must be a whole number"),
        ({"concurrent_requests": True}, "concurrent_requests must be a whole number"),
        ({"upload_window": -1}, "upload_window must be more than 0 seconds"),
        ({"ndr_delay": -0.5}, "ndr_delay must be 0 or more seconds"),
        ({"exchange_answer": "bounce"}, "exchange_answer must be 'error' or 'ndr'"),
        ({"per_hour": 1}, "unknown sandbox limit per_hour; the limits are messages_per_minute"),
    ],
)
def test_bad_limits_are_refused_naming_the_field(changes: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        replace_limits(SandboxLimits(), changes)


def test_whole_seconds_become_floats_and_other_fields_stay() -> None:
    limits = replace_limits(SandboxLimits(), {"messages_window": 5, "ndr_delay": 0})
    assert limits == SandboxLimits(messages_window=5.0, ndr_delay=0.0)
    assert isinstance(limits.messages_window, float)


def test_recipients_by_field_reads_mime_headers_and_json_collections() -> None:
    mime = b"To: A <a@x.org>, b@x.org\r\nCc: c@x.org\r\nBcc: d@x.org\r\n\r\nbody"
    assert recipients_by_field(mime, None) == ("a@x.org, b@x.org", "c@x.org", "d@x.org")
    message = {"bccRecipients": [{"emailAddress": {"address": "e@x.org"}}]}
    assert recipients_by_field(None, {"message": message}) == ("", "", "e@x.org")
