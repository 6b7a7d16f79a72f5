"""`relay.core.lifecycle` and `EntryMeta` for the sending limits (issue 12): waiting for a
budget is not failing, and does not age a message towards its lifetime."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from relay.core.errors import TransientDeliveryError
from relay.core.lifecycle import Bury, Defer, Postponed, claimed, settle
from relay.core.values import EntryMeta
from relay.core.waiting import HeldBack
from tests.unit.test_lifecycle import BACKOFF, ENTRY, EXPIRED, NOW, POLICY, SLOW

QUEUED = replace(ENTRY, attempts=3, next_attempt=NOW - 5.0, last_error="451 4.4.2 earlier")
LIMITED = TransientDeliveryError(
    "Graph answered HTTP 403 ErrorExceededMessageLimit",
    http_status=403,
    code="ErrorExceededMessageLimit",
    retry_after=30.0,
    mailbox_limit="ErrorExceededMessageLimit",
)


@pytest.mark.parametrize("wait", [12.0, None])
def test_a_postponed_attempt_defers_the_entry_unchanged(wait: float | None) -> None:
    """No budget, nothing sent: not an attempt, and the entry keeps its place in line."""
    postponed = Postponed("app@contoso.com", "messages_per_minute", wait)
    decision = settle(QUEUED, postponed, NOW, POLICY)
    assert decision == Defer(QUEUED, QUEUED.next_attempt, postponed.reason)
    assert "messages_per_minute" in decision.reason


@pytest.mark.parametrize("now", [NOW, EXPIRED, EXPIRED + 30 * 86_400.0])
def test_a_mailbox_limit_answer_defers_without_counting_an_attempt(now: float) -> None:
    """A limit answer is about the mailbox: the entry waits with the error recorded, its
    attempts and next_attempt unchanged, and is never buried, even past its lifetime."""
    decision = settle(QUEUED, LIMITED, now, POLICY)
    assert isinstance(decision, Defer)
    assert decision.entry.attempts == QUEUED.attempts
    assert decision.at == decision.entry.next_attempt == QUEUED.next_attempt
    assert decision.entry.last_error.startswith("451 4.4.2")
    assert "ErrorExceededMessageLimit" in decision.entry.last_error
    assert decision.reason == "mailbox paused: ErrorExceededMessageLimit"


def test_an_ordinary_transient_failure_past_the_lifetime_still_expires() -> None:
    """The contrast: without mailbox_limit the same 4xx at the deadline buries the entry."""
    assert isinstance(settle(QUEUED, SLOW, EXPIRED, POLICY), Bury)


@pytest.mark.parametrize(
    ("waited", "now", "buried"),
    [
        pytest.param(0.0, EXPIRED, True, id="no-wait-expires-at-the-lifetime"),
        pytest.param(3600.0, EXPIRED, False, id="an-hour-waited-extends-it"),
        pytest.param(3600.0, EXPIRED + 3599.0, False, id="just-before-the-new-deadline"),
        pytest.param(3600.0, EXPIRED + 3600.0, True, id="at-the-new-deadline"),
    ],
)
def test_expiry_is_created_plus_waited_plus_lifetime(
    waited: float, now: float, buried: bool
) -> None:
    """Time held back by the relay's own pacing does not count against retry.lifetime."""
    entry = replace(QUEUED, waited=waited)
    assert isinstance(settle(entry, SLOW, now, POLICY), Bury) is buried
    assert BACKOFF.lifetime == EXPIRED - ENTRY.created


def _held(*intervals: tuple[float, float]) -> HeldBack[str]:
    """The mailbox held back over each (start, end) interval (looks at both ends)."""
    held: HeldBack[str] = HeldBack(horizon=1e9)
    for start, end in intervals:
        held.observe({"m"}, start)
        held.observe({"m"}, end)
        held.observe(set(), end + 0.5)
    return held


def _claim(entry: EntryMeta, now: float, held: HeldBack[str]) -> EntryMeta:
    return claimed(entry, now, lambda since, until: held.held("m", since, until))


def test_claimed_credits_only_the_time_held_back_since_the_entry_was_due() -> None:
    """Held back 500..3000, due at 2000 (next_attempt): 1000 s are credited, up to now."""
    entry = replace(ENTRY, created=1000.0, next_attempt=2000.0)
    got = _claim(entry, 3000.0, _held((500.0, 3000.0)))
    assert (got.waited, got.waited_to) == (1000.0, 3000.0)


def test_claimed_counts_from_created_when_the_entry_was_due_at_once() -> None:
    """next_attempt 0 means due from its creation: time held back before it is not its own."""
    entry = replace(ENTRY, created=1000.0, next_attempt=0.0)
    got = _claim(entry, 1600.0, _held((500.0, 1500.0)))
    assert (got.waited, got.waited_to) == (500.0, 1600.0)


def test_claimed_never_credits_the_same_time_twice() -> None:
    """A second claim credits only what lies after waited_to, the end of the first credit."""
    held = _held((1000.0, 4000.0))
    entry = replace(ENTRY, created=1000.0, next_attempt=0.0)
    first = _claim(entry, 2000.0, held)
    second = _claim(first, 3000.0, held)
    assert (first.waited, second.waited, second.waited_to) == (1000.0, 2000.0, 3000.0)


def test_claimed_does_not_credit_time_not_held_back() -> None:
    """Failing, or the relay not running, still ages the message: only held-back time counts."""
    entry = replace(ENTRY, created=1000.0, next_attempt=0.0)
    got = _claim(entry, 5000.0, _held((1200.0, 1300.0), (4000.0, 4100.0)))
    assert got.waited == 200.0


def test_claimed_before_the_entry_is_due_credits_nothing() -> None:
    """Claimed early (an operator's `queue retry`): nothing to credit, waited_to is the due
    time so that the wait before it is never credited later."""
    entry = replace(ENTRY, created=1000.0, next_attempt=5000.0, waited=7.0)
    got = _claim(entry, 3000.0, _held((1000.0, 6000.0)))
    assert (got.waited, got.waited_to) == (7.0, 5000.0)


# --- EntryMeta format 3 -----------------------------------------------------------------------


def test_entry_meta_version_3_round_trips_waited_and_waited_to() -> None:
    """The credit survives a restart: both fields are in the stored metadata."""
    entry = replace(ENTRY, waited=12.5, waited_to=4321.0)
    body = json.loads(entry.to_json())
    assert (body["version"], body["waited"], body["waited_to"]) == (3, 12.5, 4321.0)
    assert EntryMeta.from_json(entry.to_json()) == entry


def _as_version_2(entry: EntryMeta) -> dict[str, object]:
    body: dict[str, object] = json.loads(entry.to_json())
    del body["waited"], body["waited_to"]
    body["version"] = 2
    return body


def test_entry_meta_version_2_reads_with_nothing_waited() -> None:
    """Entries spooled before the upgrade have waited nothing yet."""
    meta = EntryMeta.from_json(json.dumps(_as_version_2(ENTRY)).encode())
    assert (meta.waited, meta.waited_to) == (0.0, 0.0)
    assert meta == ENTRY


def test_entry_meta_version_2_with_waited_is_refused() -> None:
    """A version 2 file cannot carry a version 3 field: it is corrupt."""
    body = _as_version_2(ENTRY) | {"waited": 5.0}
    with pytest.raises(ValueError, match="version 2"):
        EntryMeta.from_json(json.dumps(body).encode())


@pytest.mark.parametrize(
    "changes", [{"waited": float("inf")}, {"waited_to": float("nan")}], ids=["waited", "waited_to"]
)
def test_entry_meta_refuses_a_non_finite_wait(changes: dict[str, float]) -> None:
    """A wait that is not a number would make every deadline meaningless."""
    with pytest.raises(ValueError, match="finite"):
        EntryMeta(**{**_fields(ENTRY), **changes})


def _fields(entry: EntryMeta) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in entry.__dataclass_fields__}


def test_entry_meta_refuses_a_negative_wait() -> None:
    """Waiting credits time; it can never take time away."""
    with pytest.raises(ValueError, match="negative"):
        replace(ENTRY, waited=-1.0)
