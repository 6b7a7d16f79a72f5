"""`relay.core.budgets` as a specification: a mailbox never sends past its rolling windows."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config.limits import LimitOverride, MailboxLimitsConfig
from relay.core.budgets import (
    WINDOWS,
    LimitName,
    MailboxLimits,
    Need,
    SendRecord,
    Usage,
    drain_eta,
    fits,
    limits_for,
)

NAMES: tuple[LimitName, ...] = tuple(WINDOWS)
PLENTY = 1_000_000
DEFAULTS = MailboxLimits(30, 10_000, 4, 10_000, 150 * 1024 * 1024)


def only(name: LimitName, limit: int) -> MailboxLimits:
    """Limits where only `name` can bind."""
    figures = {n: PLENTY for n in NAMES} | {name: limit}
    return MailboxLimits(concurrent_requests=4, **figures)


def one_of(name: LimitName) -> Need:
    """A need of 1 in `name` and nothing in the other budgets."""
    return Need(
        recipients=int(name == "recipients_per_day"),
        requests=int(name == "requests_per_10_minutes"),
        upload=int(name == "upload_per_5_minutes"),
        messages=int(name == "messages_per_minute"),
    )


# --- Usage -----------------------------------------------------------------------------------


def test_an_empty_ledger_has_room_now() -> None:
    """Nothing sent and nothing in flight: every window has room for a message at once."""
    assert Usage().wait(DEFAULTS, Need(recipients=5), now=1000.0) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_a_full_window_frees_exactly_when_its_oldest_send_leaves(name: LimitName) -> None:
    """With L sends in the window the wait is at_k + W - now, for the oldest send at_k."""
    usage = Usage()
    usage.record(100.0, one_of(name))
    usage.record(110.0, one_of(name))
    now = 120.0
    assert usage.wait(only(name, 2), one_of(name), now) == 100.0 + WINDOWS[name] - now


@pytest.mark.parametrize("name", NAMES)
def test_the_wait_is_enough_for_the_whole_need(name: LimitName) -> None:
    """A need of 2 against a full limit of 3 waits for the two oldest sends to leave."""
    usage = Usage()
    for at in (100.0, 105.0, 110.0):
        usage.record(at, one_of(name))
    need = Need(**{field: 2 * value for field, value in _fields(one_of(name)).items()})
    assert usage.wait(only(name, 3), need, 115.0) == 105.0 + WINDOWS[name] - 115.0


def _fields(need: Need) -> dict[str, int]:
    return {
        "recipients": need.recipients,
        "requests": need.requests,
        "upload": need.upload,
        "messages": need.messages,
    }


def test_a_send_leaves_the_window_at_exactly_its_time_plus_the_window() -> None:
    """The window is (now - W, now]: at at + W the send no longer counts."""
    usage = Usage()
    usage.record(100.0, Need(1))
    limits = only("messages_per_minute", 1)
    assert usage.used("messages_per_minute", 159.999) == 1
    assert usage.used("messages_per_minute", 160.0) == 0
    assert usage.wait(limits, Need(0), 160.0) == 0.0


def test_reservations_in_flight_count_against_the_window() -> None:
    """One finished send and one in flight fill a limit of 2: room comes when the finished
    one leaves."""
    usage = Usage()
    usage.record(100.0, Need(0))
    usage.reserve(Need(0))
    assert usage.used("messages_per_minute", 130.0) == 2
    assert usage.wait(only("messages_per_minute", 2), Need(0), 130.0) == 30.0


def test_wait_is_none_when_only_a_request_in_flight_can_make_room() -> None:
    """The finished sends are not enough: the caller waits for a reservation to end."""
    usage = Usage()
    usage.reserve(Need(0))
    usage.reserve(Need(0))
    assert usage.wait(only("messages_per_minute", 2), Need(0), 10.0) is None
    assert usage.in_flight == 2


def test_settling_without_use_releases_the_reservation() -> None:
    """settle(None): the request was refused before Microsoft counted it; nothing is kept."""
    usage = Usage()
    token = usage.reserve(Need(3))
    usage.settle(token, 20.0, None)
    assert usage.in_flight == 0
    assert usage.idle
    assert usage.used("recipients_per_day", 20.0) == 0


def test_settling_with_use_records_it_at_the_settle_time() -> None:
    """What Microsoft counted is in the ledger from the moment the answer came back."""
    usage = Usage()
    token = usage.reserve(Need(3))
    usage.settle(token, 20.0, Need(3))
    assert usage.in_flight == 0
    assert usage.used("recipients_per_day", 20.0) == 3
    assert usage.wait(only("messages_per_minute", 1), Need(0), 21.0) == 59.0


def test_a_record_earlier_than_the_last_counts_at_the_last() -> None:
    """Out of order, a send is clamped to the latest time: it leaves the window later."""
    usage = Usage()
    usage.record(100.0, Need(0))
    usage.record(50.0, Need(0))
    assert usage.used("messages_per_minute", 130.0) == 2
    assert usage.wait(only("messages_per_minute", 2), Need(0), 130.0) == 30.0


def test_records_given_to_the_constructor_are_sorted_by_time() -> None:
    """A ledger read back from the store may come in any order."""
    records = [SendRecord(at, "contoso", "a@contoso.com", 1, 1, 1, 0) for at in (150.0, 100.0)]
    usage = Usage(records)
    assert usage.wait(only("messages_per_minute", 2), Need(0), 155.0) == 5.0


def _busy_ledger() -> Usage:
    usage = Usage()
    for i in range(400):
        usage.record(i * 500.0, Need(recipients=i % 7, requests=2, upload=i * 10))
    return usage


@pytest.mark.parametrize("now", [150_000.0, 199_500.0])
def test_pruning_changes_no_answer(now: float) -> None:
    """prune forgets only sends older than every window: every question answers the same."""
    pruned, kept = _busy_ledger(), _busy_ledger()
    pruned.prune(now)
    limits = MailboxLimits(2, 50, 4, 30, 20_000)
    need = Need(recipients=3, requests=2, upload=500)
    for later in (now, now + 30.0, now + 400.0, now + 90_000.0):
        assert pruned.wait(limits, need, later) == kept.wait(limits, need, later)
        for name in NAMES:
            assert pruned.used(name, later) == kept.used(name, later)


def test_pruning_a_ledger_that_is_all_old_leaves_it_idle() -> None:
    """After a day of silence the mailbox can be forgotten."""
    usage = _busy_ledger()
    usage.prune(400 * 500.0 + 86_400.0)
    assert usage.idle


def test_room_is_the_smallest_share_left_of_any_budget() -> None:
    """3 of 10 messages and 1 of 100 recipients used: 70 % left, the messages bind."""
    usage = Usage()
    usage.record(0.0, Need(recipients=1, messages=3, requests=0))
    assert usage.room(MailboxLimits(10, 100, 4, 1000, 1000), 1.0) == pytest.approx(0.7)


def test_room_is_never_negative() -> None:
    """A ledger over its limit (the limit was lowered) has no room, not less than none."""
    usage = Usage()
    usage.record(0.0, Need(recipients=5))
    assert usage.room(only("recipients_per_day", 2), 1.0) == 0.0


def test_a_copy_counts_reservations_as_sent_now_and_leaves_the_original_alone() -> None:
    """copy(now) is for simulation: what is in flight becomes a send at `now`."""
    usage = Usage()
    usage.record(10.0, Need(1))
    usage.reserve(Need(2))
    twin = usage.copy(40.0)
    assert twin.in_flight == 0
    assert twin.used("recipients_per_day", 40.0) == 3
    assert twin.wait(only("messages_per_minute", 2), Need(0), 65.0) == 5.0
    twin.record(80.0, Need(9))
    assert usage.used("recipients_per_day", 80.0) == 3
    assert usage.in_flight == 1


# --- the safety properties -----------------------------------------------------------------


_LIMITS = st.builds(
    MailboxLimits,
    st.integers(1, 4),
    st.integers(1, 8),
    st.just(4),
    st.integers(1, 6),
    st.integers(1, 50),
)


def _needs(limits: MailboxLimits) -> st.SearchStrategy[Need]:
    """Needs that an empty budget takes (fits() is None)."""
    return st.builds(
        Need,
        recipients=st.integers(0, limits.recipients_per_day),
        requests=st.integers(0, limits.requests_per_10_minutes),
        upload=st.integers(0, limits.upload_per_5_minutes),
        messages=st.integers(0, limits.messages_per_minute),
    )


def _assert_no_window_overrun(
    limits: MailboxLimits, counted: list[tuple[float, Need]], who: str
) -> None:
    for name in NAMES:
        for end, _ in counted:
            total = sum(n.amount(name) for at, n in counted if end - WINDOWS[name] < at <= end)
            assert total <= limits.limit(name), f"{who} counts {total} {name} in a window"


@settings(max_examples=150, deadline=None)
@given(data=st.data(), limits=_LIMITS)
def test_a_greedy_sender_never_overruns_any_window(
    data: st.DataObject, limits: MailboxLimits
) -> None:
    """Sending whenever wait() is 0, and otherwise advancing time by wait(), never puts more
    than L in any window of W, for all four windows at once."""
    usage, now = Usage(), 0.0
    sent: list[tuple[float, Need]] = []
    for _ in range(data.draw(st.integers(1, 25))):
        need = data.draw(_needs(limits))
        now += data.draw(st.integers(0, 400))
        wait = usage.wait(limits, need, now)
        assert wait is not None, "nothing is in flight, so finished sends must make room"
        now += wait
        assert usage.wait(limits, need, now) == 0.0
        usage.record(now, need)
        sent.append((now, need))
    _assert_no_window_overrun(limits, sent, "the relay")


@settings(max_examples=150, deadline=None)
@given(data=st.data(), limits=_LIMITS)
def test_microsoft_never_counts_more_than_the_limit(
    data: st.DataObject, limits: MailboxLimits
) -> None:
    """With requests in flight: whenever Microsoft counts each send at some moment between its
    reservation and its settle, Microsoft's count in any window never exceeds L."""
    usage, now = Usage(), 0.0
    pending: list[tuple[float, int, Need]] = []  # (settle time, token, need), sorted
    counted: list[tuple[float, Need]] = []

    def settle_until(moment: float) -> None:
        while pending and pending[0][0] <= moment:
            at, token, need = pending.pop(0)
            usage.settle(token, at, need)

    for _ in range(data.draw(st.integers(1, 20))):
        need = data.draw(_needs(limits))
        now += data.draw(st.integers(0, 300))
        settle_until(now)
        while (wait := usage.wait(limits, need, now)) != 0.0:
            target = now + wait if wait is not None else pending[0][0]
            if pending:
                target = min(target, pending[0][0])
            now = target
            settle_until(now)
        duration = data.draw(st.integers(0, 120))
        token = usage.reserve(need)
        counted.append((now + data.draw(st.integers(0, duration)), need))
        pending.append((now + duration, token, need))
        pending.sort(key=lambda item: (item[0], item[1]))
    _assert_no_window_overrun(limits, counted, "Microsoft")


# --- limits_for, fits, drain_eta ---------------------------------------------------------------


def test_limits_for_gives_the_defaults_without_overrides() -> None:
    """The section's defaults are Exchange Online's and Graph's figures."""
    assert limits_for(MailboxLimitsConfig(), "a@contoso.com") == DEFAULTS


OVERRIDES = MailboxLimitsConfig(
    overrides=[
        LimitOverride(mailboxes=["alerts@contoso.com"], messages_per_minute=10),
        LimitOverride(mailboxes=["*@contoso.com"], messages_per_minute=20, recipients_per_day=500),
    ]
)


@pytest.mark.parametrize(
    ("mailbox", "messages", "recipients"),
    [
        pytest.param("alerts@contoso.com", 10, 10_000, id="first-match-wins-unset-keeps-default"),
        pytest.param("ALERTS@Contoso.COM", 10, 10_000, id="ascii-case-folded"),
        pytest.param("erp@contoso.com", 20, 500, id="second-override"),
        pytest.param("erp@fabrikam.com", 30, 10_000, id="no-match-defaults"),
        pytest.param("\u212alerts@contoso.com", 20, 500, id="kelvin-sign-is-not-k"),
        pytest.param("\u212aerp@fabrikam.com", 30, 10_000, id="kelvin-sign-no-match"),
    ],
)
def test_limits_for_takes_the_first_matching_override(
    mailbox: str, messages: int, recipients: int
) -> None:
    """The first override whose globs match (ASCII case-insensitively) wins; keys it leaves
    unset keep the section's value."""
    limits = limits_for(OVERRIDES, mailbox)
    assert (limits.messages_per_minute, limits.recipients_per_day) == (messages, recipients)
    assert limits.concurrent_requests == 4


def test_the_kelvin_sign_does_not_match_a_k_pattern() -> None:
    """U+212A lower-cases to "k" in Unicode; Exchange addresses fold ASCII only."""
    config = MailboxLimitsConfig(
        overrides=[LimitOverride(mailboxes=["kelvin@contoso.com"], messages_per_minute=1)]
    )
    assert limits_for(config, "\u212aelvin@contoso.com").messages_per_minute == 30
    assert limits_for(config, "KELVIN@contoso.com").messages_per_minute == 1


@pytest.mark.parametrize(
    ("need", "expected"),
    [
        pytest.param(Need(10, requests=5, upload=100, messages=2), None, id="fits-exactly"),
        pytest.param(Need(11), "recipients_per_day", id="recipients"),
        pytest.param(Need(1, messages=3), "messages_per_minute", id="messages"),
        pytest.param(Need(1, requests=6), "requests_per_10_minutes", id="requests"),
        pytest.param(Need(1, upload=101), "upload_per_5_minutes", id="upload"),
    ],
)
def test_fits_names_the_limit_a_need_exceeds_on_its_own(
    need: Need, expected: LimitName | None
) -> None:
    """A need larger than a whole budget could never be sent through the mailbox."""
    assert fits(MailboxLimits(2, 10, 4, 5, 100), need) == expected


def test_drain_eta_is_zero_when_nothing_waits() -> None:
    assert drain_eta(Usage(), DEFAULTS, [], 500.0) == 0.0


def test_drain_eta_of_90_messages_at_30_a_minute_is_two_minutes() -> None:
    """An empty ledger sends 30 now, 30 at +60 s and the last 30 at +120 s."""
    assert drain_eta(Usage(), DEFAULTS, [1] * 90, 500.0) == 120.0


def test_drain_eta_follows_the_recipient_budget_when_it_binds() -> None:
    """10 recipients a day, three messages of 4: two go now, the third when the first leaves
    the 24-hour window."""
    limits = MailboxLimits(30, 10, 4, 10_000, 1000)
    assert drain_eta(Usage(), limits, [4, 4, 4], 0.0) == 86_400.0


def test_drain_eta_counts_requests_in_flight_as_sent_now() -> None:
    """One message a minute with one in flight: the waiting one goes a minute from now."""
    usage = Usage()
    usage.reserve(Need(1))
    assert drain_eta(usage, only("messages_per_minute", 1), [1], 10.0) == 60.0
    assert usage.in_flight == 1


def test_drain_eta_caps_a_message_larger_than_the_recipient_budget() -> None:
    """A message over the whole budget is refused elsewhere; the estimate does not hang."""
    limits = MailboxLimits(30, 10, 4, 10_000, 1000)
    assert drain_eta(Usage(), limits, [50], 0.0) == 0.0
