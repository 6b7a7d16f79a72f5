"""`relay.delivery.pacing`'s pure parts as a specification: what a send uses of its mailbox's
budgets, what Microsoft counted of a failure, and what a client hears about a full budget."""

from __future__ import annotations

from dataclasses import replace

import pytest

from relay.config.schema import Config
from relay.core.budgets import Need
from relay.core.errors import (
    DeliveryError,
    PermanentDeliveryError,
    SmtpReply,
    TransientDeliveryError,
)
from relay.core.lifecycle import Postponed
from relay.core.values import Route
from relay.delivery.budget import MailboxBudgets
from relay.delivery.pacing import counted, need_for_large, need_of, no_budget_reply, over_budget
from relay.graph.large import CHUNK_SIZE
from tests.unit.test_config import MINIMAL, parse
from tests.unit.test_lifecycle import ENTRY

MIB = 1024 * 1024
UPLOAD_LIMIT = 150 * MIB
NEED = Need(recipients=3, requests=9, upload=5 * MIB)


@pytest.mark.parametrize(
    ("size", "upload"),
    [
        pytest.param(8 * MIB, 6 * MIB, id="three-quarters-of-the-mime"),
        pytest.param(40 * MIB, 30 * MIB, id="several-chunks"),
        pytest.param(400 * MIB, UPLOAD_LIMIT, id="capped-at-the-upload-budget"),
    ],
)
def test_the_large_path_uses_a_request_per_chunk_and_session(size: int, upload: int) -> None:
    """Decoded attachments are at most 3/4 of the MIME, capped at the whole upload budget;
    requests are the draft, the send, a clean-up and two per chunk (a PUT, at most a session)."""
    need = need_for_large(4, size, UPLOAD_LIMIT)
    chunks = -(-upload // CHUNK_SIZE)
    assert need == Need(recipients=4, requests=3 + 2 * chunks, upload=upload, messages=1)


def test_a_large_messages_need_never_exceeds_the_upload_budget() -> None:
    """A message must not be refused because the estimate errs high."""
    assert need_for_large(1, 10**12, 1000).upload == 1000


@pytest.mark.parametrize(
    ("size", "large_messages", "large"),
    [
        pytest.param(1000, "upload", False, id="small"),
        pytest.param(3 * MIB, "upload", False, id="fits-one-request"),
        pytest.param(3 * MIB + 512 * 1024, "upload", True, id="over-4-MB-as-base64"),
        pytest.param(20 * MIB, "reject", False, id="reject-mode-one-request"),
    ],
)
def test_need_of_judges_the_path_from_the_entrys_size(
    size: int, large_messages: str, large: bool
) -> None:
    """Before the message is read: over Graph's 4 MB as base64 it takes the large path (when
    uploads are on), else one request for its envelope recipients."""
    entry = replace(ENTRY, size=size)
    expected = need_for_large(2, size, UPLOAD_LIMIT) if large else Need(2)
    assert need_of(entry, large_messages, UPLOAD_LIMIT) == expected


TOKEN_FAILURE = TransientDeliveryError(
    "AADSTS7000215", reply=SmtpReply(451, "4.7.0", "Authentication with Microsoft 365 failed")
)
GRAPH_401 = TransientDeliveryError(
    "401", reply=SmtpReply(451, "4.7.0", "token refused"), http_status=401
)
THROTTLED = TransientDeliveryError("429", http_status=429, mailbox_limit="ApplicationThrottled")
REFUSED = PermanentDeliveryError(
    "denied", reply=SmtpReply(550, "5.7.1", "denied"), http_status=403, code="ErrorAccessDenied"
)
NO_ANSWER = TransientDeliveryError("Graph did not answer within 30s")
REFUSAL = Need(recipients=0, requests=NEED.requests, upload=NEED.upload, messages=0)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        pytest.param(TOKEN_FAILURE, None, id="token-failure-nothing"),
        pytest.param(GRAPH_401, REFUSAL, id="graph-401-requests"),
        pytest.param(THROTTLED, REFUSAL, id="throttled-requests"),
        pytest.param(REFUSED, REFUSAL, id="refused-requests"),
        pytest.param(NO_ANSWER, NEED, id="no-answer-everything"),
    ],
)
def test_counted_is_what_microsoft_counted_of_a_failed_send(
    failure: DeliveryError, expected: Need | None
) -> None:
    """No request went out: nothing. Graph answered: its requests and uploads, no message.
    No answer: everything, since it may have been sent."""
    assert counted(failure, NEED) == expected


def _budgets() -> MailboxBudgets:
    config = parse(MINIMAL)
    assert isinstance(config, Config)
    return MailboxBudgets(config=lambda: config, store=None)


ROUTE = Route(name="contoso", auth_object="contoso", mailbox="app@contoso.com")


def test_over_the_recipient_budget_is_refused_554_5_5_3() -> None:
    """More recipients than a whole day's budget could never go out: refused, not kept."""
    error = over_budget(ROUTE, "recipients_per_day", Need(10_001), _budgets())
    assert isinstance(error, PermanentDeliveryError)
    assert str(error.reply) == (
        "554 5.5.3 Too many recipients for the sending limit of app@contoso.com: "
        "10001 > 10000 per day"
    )
    assert error.code == "OverSendingBudget"
    assert "recipients_per_day" in error.remedy


@pytest.mark.parametrize("limit", ["upload_per_5_minutes", "requests_per_10_minutes"])
def test_over_another_budget_is_refused_552_5_3_4(limit: str) -> None:
    """A message that needs more uploads or requests than the whole budget is too large."""
    error = over_budget(ROUTE, limit, Need(1, requests=20_000), _budgets())  # type: ignore[arg-type]
    assert isinstance(error, PermanentDeliveryError)
    assert (
        str(error.reply) == "552 5.3.4 Message too large for the sending limits of app@contoso.com"
    )


@pytest.mark.parametrize(
    ("wait", "when"),
    [
        pytest.param(12.2, "in 13 s", id="rounded-up"),
        pytest.param(30.0, "in 30 s", id="whole"),
        pytest.param(0.2, "in 1 s", id="at-least-one"),
        pytest.param(0.0, "in 1 s", id="zero-is-one"),
        pytest.param(None, "later", id="when-a-request-ends"),
    ],
)
def test_no_budget_reply_tells_the_client_when_to_come_back(wait: float | None, when: str) -> None:
    """direct mode: 451 4.7.0 with the mailbox and the seconds until room, rounded up."""
    reply = no_budget_reply(Postponed("app@contoso.com", "messages_per_minute", wait))
    assert str(reply) == f"451 4.7.0 Sending limit of app@contoso.com reached, try again {when}"
    assert reply.is_transient


def test_no_budget_reply_never_echoes_control_characters() -> None:
    """A mailbox name goes into an SMTP reply line: nothing unprintable reaches the client."""
    reply = no_budget_reply(Postponed("a\r\nb@contoso.com", "messages_per_minute", 5.0))
    assert "\r" not in str(reply)
    assert "\n" not in str(reply)
    assert "a??b@contoso.com" in str(reply)
