"""Graph's and Exchange's answers that a mailbox reached a sending limit (issue 12): which
answers are limits, and that each stays a transient 451 4.4.2 that pauses the mailbox."""

from __future__ import annotations

import json

import pytest

from relay.core.errors import TransientDeliveryError
from relay.graph.errors import MAILBOX_LIMIT_CODES
from tests.unit.test_graph_errors import _body, _map

QUOTA_NDR = (
    "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to "
    "process message due to a permanent exception"
)

# Exchange's code one level down, under a generic outer code.
INNER_LIMIT = json.dumps(
    {
        "error": {
            "code": "ErrorAccessDenied",
            "message": "Denied.",
            "innerError": {"code": "ErrorExceededMessageLimit", "request-id": "r-1"},
        }
    }
).encode()


@pytest.mark.parametrize(
    ("status", "body", "limit"),
    [
        pytest.param(
            429, _body("ApplicationThrottled"), "ApplicationThrottled", id="429-throttled"
        ),
        pytest.param(
            429,
            _body("ApplicationThrottled", "Application is over its MailboxConcurrency limit."),
            "MailboxConcurrency",
            id="429-mailbox-concurrency",
        ),
        pytest.param(429, _body("TooManyRequests"), "TooManyRequests", id="429-any-code"),
        pytest.param(429, b"", "TooManyRequests", id="429-no-body"),
        pytest.param(429, b"<html>busy</html>", "TooManyRequests", id="429-html"),
        pytest.param(
            403,
            _body("ErrorExceededMessageLimit"),
            "ErrorExceededMessageLimit",
            id="403-message-limit",
        ),
        pytest.param(
            400,
            _body("ErrorExceededMessageLimit"),
            "ErrorExceededMessageLimit",
            id="400-message-limit",
        ),
        pytest.param(
            403,
            INNER_LIMIT,
            "ErrorExceededMessageLimit",
            id="inner-code",
        ),
        pytest.param(
            503, _body("ServiceUnavailable", QUOTA_NDR), "QuotaExceeded", id="503-quota-text"
        ),
        pytest.param(
            503, _body("ServiceUnavailable", "5.2.0 submission refused"), "5.2.0", id="503-5.2.0"
        ),
        pytest.param(
            503, _body("MailboxConcurrency"), "MailboxConcurrency", id="503-mailbox-concurrency"
        ),
        pytest.param(
            503,
            _body("CommandConcurrencyLimitReached"),
            "CommandConcurrencyLimitReached",
            id="503-command-concurrency",
        ),
        pytest.param(
            403,
            _body("CommandConcurrencyLimitReached"),
            "CommandConcurrencyLimitReached",
            id="403-command-concurrency",
        ),
        pytest.param(
            400,
            _body("SubmissionQuotaExceeded"),
            "SubmissionQuotaExceeded",
            id="400-submission-quota-code",
        ),
        pytest.param(503, _body("ServiceUnavailable"), None, id="503-plain"),
        pytest.param(500, _body("InternalServerError", QUOTA_NDR), None, id="500-not-a-limit"),
        pytest.param(403, _body("ErrorAccessDenied", "sending limit"), None, id="403-text-only"),
        pytest.param(403, _body("ErrorSendAsDenied"), None, id="send-as-denied"),
        pytest.param(400, _body("ErrorInvalidRecipients"), None, id="invalid-recipients"),
        pytest.param(404, _body("ErrorInvalidUser"), None, id="invalid-user"),
        pytest.param(401, _body("InvalidAuthenticationToken"), None, id="401"),
    ],
)
def test_which_answers_say_the_mailbox_reached_a_limit(
    status: int, body: bytes, limit: str | None
) -> None:
    """Every 429 is a limit; a known limit code at any status is one; Exchange's quota and
    concurrency texts count at 429 and 503 only."""
    error = _map(status, body)
    assert (error.mailbox_limit if isinstance(error, TransientDeliveryError) else None) == limit


LIMIT_ANSWERS = [
    (429, _body("ApplicationThrottled")),
    (403, _body("ErrorExceededMessageLimit")),
    (503, _body("ServiceUnavailable", QUOTA_NDR)),
    (503, _body("CommandConcurrencyLimitReached")),
]


@pytest.mark.parametrize(("status", "body"), LIMIT_ANSWERS)
def test_a_limit_answer_is_a_transient_451_4_4_2(status: int, body: bytes) -> None:
    """The waiting client hears 451 4.4.2 (hybrid queues it); the message never bounces."""
    error = _map(status, body)
    assert isinstance(error, TransientDeliveryError)
    assert error.reply.is_transient
    assert (error.reply.code, error.reply.status) == (451, "4.4.2")
    assert error.reply.text.startswith("Sending limit of the mailbox reached")
    assert error.http_status == status


@pytest.mark.parametrize(("status", "body"), LIMIT_ANSWERS)
def test_a_limit_answer_names_the_remedy(status: int, body: bytes) -> None:
    """The log says what to change: the budgets, or a pool of mailboxes."""
    remedy = _map(status, body).remedy
    assert "mailbox_limits" in remedy
    assert "pool" in remedy


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("Sat, 01 Mar 2025 12:00:30 GMT", 30.0), ("soon", None)],
)
@pytest.mark.parametrize(("status", "body"), LIMIT_ANSWERS[:2])
def test_a_limit_answer_carries_retry_after(
    status: int, body: bytes, header: str, expected: float | None
) -> None:
    """Retry-After, as delta-seconds or an HTTP-date, says how long the mailbox pauses."""
    error = _map(status, body, **{"Retry-After": header})
    assert isinstance(error, TransientDeliveryError)
    assert error.retry_after == expected


def test_the_limit_codes_are_the_documented_ones() -> None:
    """Issue 12's list, plus the variants Exchange writes them in."""
    assert {
        "ErrorExceededMessageLimit",
        "SubmissionQuotaExceeded",
        "CommandConcurrencyLimitReached",
        "MailboxConcurrency",
        "ApplicationThrottled",
    } <= MAILBOX_LIMIT_CODES


@pytest.mark.parametrize(
    ("status", "text", "limit"),
    [
        (503, "Exchange 15.2.0 is unavailable", None),
        (503, "554 5.2.0 STOREDRV.Submission.Exception", "5.2.0"),
        (503, "550 5.1.90 daily limit for message recipients", "5.1.90"),
    ],
)
def test_status_codes_in_texts_match_only_as_whole_tokens(
    status: int, text: str, limit: str | None
) -> None:
    """A version number such as 15.2.0 is not Exchange's 5.2.0: a generic 503 must still age
    towards expiry instead of waiting for ever as a 'limit'."""
    error = _map(status, _body("ServiceUnavailable", text))
    assert getattr(error, "mailbox_limit", None) == limit


def test_mailbox_concurrency_nested_under_application_throttled_is_a_short_pause() -> None:
    body = {
        "error": {
            "code": "ApplicationThrottled",
            "message": "Throttled.",
            "innerError": {"code": "MailboxConcurrency", "request-id": "rid"},
        }
    }
    error = _map(429, json.dumps(body).encode())
    assert getattr(error, "mailbox_limit", None) == "MailboxConcurrency"
