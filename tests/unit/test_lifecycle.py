"""`relay.core.lifecycle.settle` as a specification: one decision for every attempt result."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.errors import PermanentDeliveryError, SmtpReply, TransientDeliveryError
from relay.core.lifecycle import (
    NO_ROUTE_STATUS,
    Bury,
    Complete,
    Crashed,
    Defer,
    Discard,
    NoRoute,
    Quarantine,
    SettlePolicy,
    names_explicitly,
    settle,
)
from relay.core.limits import CRASH_LIMIT
from relay.core.schedule import Backoff
from relay.core.values import Delivered, EntryMeta

DAY = 86400.0
BACKOFF = Backoff(first=60.0, max=3600.0, lifetime=5 * DAY)
POLICY = SettlePolicy(backoff=BACKOFF, client_senders={"erp": ("*@contoso.com",)})
ENTRY = EntryMeta(
    queue_id="Q1",
    created=1000.0,
    mail_from="app@contoso.com",
    recipients=("a@example.com", "b@example.com"),
    client="erp",
    client_ip="10.0.0.5",
    auth_object="contoso",
    mailbox="app@contoso.com",
    route="contoso",
    message_id="<m@x>",
    size=100,
    sender="app@contoso.com",
)
NOW = ENTRY.created + 10.0
EXPIRED = ENTRY.created + BACKOFF.lifetime
SLOW = TransientDeliveryError("503", http_status=503)
REFUSED = PermanentDeliveryError(
    "send as denied",
    reply=SmtpReply(550, "5.7.1", "Not allowed to send as this sender"),
    code="ErrorSendAsDenied",
    request_id="r-1",
    remedy="grant Send As",
)


def test_delivered_completes_the_entry() -> None:
    assert settle(ENTRY, Delivered(202, "r", 5), NOW, POLICY) == Complete(ENTRY)


def test_a_transient_failure_defers_with_backoff_and_counts_an_attempt() -> None:
    """First failure: retry after retry.first; attempts+1 and the error recorded."""
    decision = settle(ENTRY, SLOW, NOW, POLICY)
    assert isinstance(decision, Defer)
    assert decision.at == NOW + 60.0
    assert decision.entry.next_attempt == decision.at
    assert decision.entry.attempts == 1
    assert decision.entry.last_error.startswith("451 4.4.2")
    assert not decision.alert


def test_jitter_spreads_the_backoff_by_at_most_a_quarter() -> None:
    decision = settle(ENTRY, SLOW, NOW, POLICY, jitter=1.0)
    assert isinstance(decision, Defer)
    assert decision.at == NOW + 75.0


def test_retry_after_is_honoured_exactly() -> None:
    throttled = TransientDeliveryError("429", http_status=429, retry_after=7.0)
    decision = settle(replace(ENTRY, attempts=6), throttled, NOW, POLICY, jitter=0.9)
    assert isinstance(decision, Defer)
    assert decision.at == NOW + 7.0


def test_an_alerting_transient_failure_is_deferred_with_an_alert() -> None:
    """A wrong client secret heals only when an administrator fixes it: keep retrying, loudly."""
    bad_secret = TransientDeliveryError("AADSTS7000215", alert=True)
    decision = settle(ENTRY, bad_secret, NOW, POLICY)
    assert isinstance(decision, Defer)
    assert decision.alert


@pytest.mark.parametrize("late", [0.0, 1.0, DAY])
def test_a_transient_failure_at_or_after_the_lifetime_buries_with_4_4_7(late: float) -> None:
    decision = settle(replace(ENTRY, attempts=40), SLOW, EXPIRED + late, POLICY)
    assert isinstance(decision, Bury)
    assert decision.expired
    assert decision.reason.startswith("expired after 41 attempts")
    assert decision.bounce is not None
    assert decision.bounce.status == "4.4.7"


def test_a_permanent_failure_buries_and_bounces_with_its_own_status() -> None:
    decision = settle(ENTRY, REFUSED, NOW, POLICY)
    assert isinstance(decision, Bury)
    assert not decision.expired
    assert (
        decision.reason == "refused: 550 5.7.1 Not allowed to send as this sender ErrorSendAsDenied"
    )
    assert decision.bounce is not None
    assert decision.bounce.status == "5.7.1"
    assert "ErrorSendAsDenied" in decision.bounce.diagnostic
    assert "r-1" in decision.bounce.diagnostic
    assert "grant Send As" in decision.bounce.explanation


def test_a_permanent_refusal_the_waiting_client_heard_is_discarded_not_bounced() -> None:
    decision = settle(ENTRY, REFUSED, NOW, POLICY, answered=True)
    assert isinstance(decision, Discard)


def test_a_transient_failure_is_deferred_even_when_the_client_waits() -> None:
    """`answered` only concerns refusals: a transient failure is the queue's business."""
    assert isinstance(settle(ENTRY, SLOW, NOW, POLICY, answered=True), Defer)


def test_no_route_defers_with_an_alert_and_counts_an_attempt() -> None:
    decision = settle(ENTRY, NoRoute("app@contoso.com"), NOW, POLICY)
    assert isinstance(decision, Defer)
    assert decision.alert
    assert decision.entry.attempts == 1
    assert decision.reason == "no route matches the sender <app@contoso.com>"


def test_no_route_for_a_whole_lifetime_buries_with_a_dsn_naming_the_cause() -> None:
    decision = settle(ENTRY, NoRoute("app@contoso.com"), EXPIRED, POLICY)
    assert isinstance(decision, Bury)
    assert decision.expired
    assert decision.bounce is not None
    assert decision.bounce.status == NO_ROUTE_STATUS
    assert "no outbound route for the sender <app@contoso.com>" in decision.bounce.explanation


@pytest.mark.parametrize("crashes", range(CRASH_LIMIT - 1))
def test_a_crash_below_the_limit_defers_without_counting_an_attempt(crashes: int) -> None:
    decision = settle(replace(ENTRY, crashes=crashes), Crashed("KeyError"), NOW, POLICY)
    assert isinstance(decision, Defer)
    assert decision.alert
    assert decision.entry.crashes == crashes + 1
    assert decision.entry.attempts == ENTRY.attempts
    assert decision.at == NOW + BACKOFF.first


@pytest.mark.parametrize("crashes", [CRASH_LIMIT - 1, CRASH_LIMIT, CRASH_LIMIT + 5])
def test_a_crash_reaching_the_limit_quarantines(crashes: int) -> None:
    """Even after its lifetime: a message that crashes the relay is for an operator."""
    decision = settle(replace(ENTRY, crashes=crashes), Crashed("KeyError"), EXPIRED, POLICY)
    assert isinstance(decision, Quarantine)
    assert decision.entry.crashes == crashes + 1
    assert "KeyError" in decision.reason


# --- whether a DSN is due ---------------------------------------------------------------------


def _bounce_of(entry: EntryMeta, policy: SettlePolicy = POLICY) -> object:
    decision = settle(entry, REFUSED, NOW, policy)
    assert isinstance(decision, Bury)
    return decision.bounce


def test_no_dsn_when_bounces_are_off() -> None:
    assert _bounce_of(ENTRY, replace(POLICY, bounces=False)) is None


def test_no_dsn_to_the_null_sender() -> None:
    assert _bounce_of(replace(ENTRY, mail_from="")) is None


def test_no_dsn_about_a_dsn() -> None:
    assert _bounce_of(replace(ENTRY, is_bounce=True)) is None


def test_no_dsn_for_a_client_that_is_no_longer_configured() -> None:
    assert _bounce_of(replace(ENTRY, client="gone")) is None


def test_no_dsn_to_a_forged_sender_of_a_client_allowed_any_sender() -> None:
    """Backscatter (#11 item 5): under `senders: ["*"]` MAIL FROM proves nothing."""
    policy = replace(POLICY, client_senders={"erp": ("*",)})
    assert _bounce_of(replace(ENTRY, mail_from="victim@external.example"), policy) is None


def test_a_dsn_to_a_sender_the_client_names_by_domain() -> None:
    assert _bounce_of(ENTRY) is not None


@pytest.mark.parametrize(
    ("patterns", "address", "named"),
    [
        (("*",), "a@contoso.com", False),
        (("*@*",), "a@contoso.com", False),
        (("?*@*?",), "a@contoso.com", False),
        (("*@contoso.com",), "a@contoso.com", True),
        (("*@CONTOSO.com",), "A@contoso.COM", True),
        (("scanner@contoso.com",), "scanner@contoso.com", True),
        (("scanner@contoso.com",), "ceo@contoso.com", False),
        (("*", "*@contoso.com"), "a@fabrikam.com", False),
        (("*", "*@contoso.com"), "a@contoso.com", True),
        (("*@*.contoso.com",), "a@eu.contoso.com", True),
        ((), "a@contoso.com", False),
    ],
)
def test_which_patterns_name_a_sender_explicitly(
    patterns: tuple[str, ...], address: str, named: bool
) -> None:
    assert names_explicitly(patterns, address) is named


# --- properties -------------------------------------------------------------------------------

results = st.one_of(
    st.builds(Delivered, st.just(202), st.none(), st.integers(0, 10_000)),
    st.builds(
        TransientDeliveryError,
        st.just("x"),
        retry_after=st.none() | st.floats(0, 3600),
        alert=st.booleans(),
    ),
    st.just(REFUSED),
    st.builds(NoRoute, st.just("a@contoso.com")),
    st.builds(Crashed, st.sampled_from(["KeyError", "internal error"])),
)


@given(
    result=results,
    age=st.floats(0, 10 * DAY),
    attempts=st.integers(0, 1000),
    crashes=st.integers(0, CRASH_LIMIT - 1),
    jitter=st.floats(0, 1, exclude_max=True),
)
def test_a_deferral_is_never_earlier_than_now_nor_past_the_lifetime_without_retry_after(
    result: object, age: float, attempts: int, crashes: int, jitter: float
) -> None:
    entry = replace(ENTRY, attempts=attempts, crashes=crashes)
    now = entry.created + age
    decision = settle(entry, result, now, POLICY, jitter=jitter)  # type: ignore[arg-type]
    if isinstance(decision, Defer):
        assert decision.at >= now
        assert decision.entry.next_attempt == decision.at
        honoured = isinstance(result, TransientDeliveryError) and result.retry_after is not None
        if not honoured and not isinstance(result, Crashed):
            assert decision.at <= entry.created + BACKOFF.lifetime
        assert now < entry.created + BACKOFF.lifetime or isinstance(result, Crashed)


@given(result=results, age=st.floats(0, 10 * DAY), answered=st.booleans())
def test_every_decision_keeps_the_entry_identity(
    result: object, age: float, answered: bool
) -> None:
    decision = settle(ENTRY, result, ENTRY.created + age, POLICY, answered=answered)  # type: ignore[arg-type]
    assert decision.entry.queue_id == ENTRY.queue_id
    assert decision.entry.recipients == ENTRY.recipients
    if not isinstance(decision, Complete | Quarantine) and not isinstance(result, Crashed):
        assert decision.entry.attempts == ENTRY.attempts + 1


def test_settle_policy_from_config_takes_retry_bounces_and_client_senders() -> None:
    from relay.config.schema import Config

    config = Config.model_validate(
        {
            "smtp": {"hostname": "relay.test", "listeners": [{"port": 0}]},
            "clients": [{"name": "erp", "networks": ["10.0.0.0/8"], "senders": ["*@contoso.com"]}],
            "auth_objects": {
                "contoso": {
                    "tenant_id": "00000000-0000-0000-0000-000000000000",
                    "client_id": "00000000-0000-0000-0000-000000000000",
                    "client_secret": "s",
                }
            },
            "routes": [{"senders": ["*@contoso.com"], "auth_object": "contoso"}],
            "delivery": {"retry": {"first": "2m", "max": "1h", "lifetime": "1d"}, "bounces": False},
        }
    )
    policy = SettlePolicy.from_config(config)
    assert policy.backoff == Backoff(120.0, 3600.0, DAY)
    assert policy.bounces is False
    assert policy.client_senders == {"erp": ("*@contoso.com",)}
