"""DESIGN §5's table as a pure function: Graph's HTTP answer -> the relay's delivery error."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from relay.core.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from relay.graph.errors import error_from_response, parse_graph_error, parse_retry_after

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
REQUEST_ID = "0f3a1c2e-1111-2222-3333-444455556666"


def _clock() -> datetime:
    return NOW


def _body(code: str, message: str = "Something went wrong.", **inner: str) -> bytes:
    inner_error = {"request-id": REQUEST_ID, "date": "2025-03-01T12:00:00", **inner}
    return json.dumps(
        {"error": {"code": code, "message": message, "innerError": inner_error}}
    ).encode()


def _map(status: int, body: bytes = b"", **headers: str) -> DeliveryError:
    return error_from_response(status, headers, body, clock=_clock)


@pytest.mark.parametrize(
    ("status", "code", "kind", "reply", "remedy_words"),
    [
        (429, "ApplicationThrottled", TransientDeliveryError, (451, "4.4.2"), "Retry-After"),
        (500, "InternalServerError", TransientDeliveryError, (451, "4.4.2"), "Retry-After"),
        (502, "BadGateway", TransientDeliveryError, (451, "4.4.2"), "Retry-After"),
        (503, "ServiceUnavailable", TransientDeliveryError, (451, "4.4.2"), "Retry-After"),
        (504, "GatewayTimeout", TransientDeliveryError, (451, "4.4.2"), "Retry-After"),
        (507, "ErrorQuotaExceeded", TransientDeliveryError, (451, "4.4.2"), "Retry-After"),
        (401, "InvalidAuthenticationToken", TransientDeliveryError, (451, "4.7.0"), "tenant_id"),
        (403, "ErrorSendAsDenied", PermanentDeliveryError, (550, "5.7.1"), "Send As"),
        (403, "ErrorAccessDenied", PermanentDeliveryError, (550, "5.7.1"), "admin consent"),
        (403, "Authorization_RequestDenied", PermanentDeliveryError, (550, "5.7.1"), "Mail.Send"),
        (404, "ErrorInvalidUser", PermanentDeliveryError, (550, "5.1.1"), "does not exist"),
        (404, "ResourceNotFound", PermanentDeliveryError, (550, "5.1.1"), "route's mailbox"),
        (404, "MailboxNotEnabledForRESTAPI", PermanentDeliveryError, (550, "5.1.1"), "licence"),
        (400, "ErrorInvalidRecipients", PermanentDeliveryError, (550, "5.1.3"), "recipient"),
        (400, "ErrorMimeContentInvalid", PermanentDeliveryError, (554, "5.6.0"), "parse"),
        (400, "ErrorMimeContentInvalidBase64String", PermanentDeliveryError, (554, "5.6.0"), ""),
        (400, "InvalidInternetMessageHeader", PermanentDeliveryError, (554, "5.6.0"), ""),
        (400, "ErrorInvalidInternetMessageHeader", PermanentDeliveryError, (554, "5.6.0"), ""),
        (400, "BadRequest", PermanentDeliveryError, (554, "5.6.0"), ""),
        (413, "RequestEntityTooLarge", PermanentDeliveryError, (552, "5.3.4"), "4 MB"),
        (400, "ErrorMessageSizeExceeded", PermanentDeliveryError, (552, "5.3.4"), "4 MB"),
        (409, "ErrorItemConflict", PermanentDeliveryError, (554, "5.0.0"), "error code"),
        (405, "Request_BadRequest", PermanentDeliveryError, (554, "5.0.0"), "error code"),
        (407, "", TransientDeliveryError, (451, "4.4.2"), "proxy"),
        (408, "", TransientDeliveryError, (451, "4.4.2"), "proxy"),
    ],
)
def test_each_graph_answer_maps_to_the_design_table_row(
    status: int,
    code: str,
    kind: type[DeliveryError],
    reply: tuple[int, str],
    remedy_words: str,
) -> None:
    """Status and code pick the error class, the SMTP reply and the remedy (DESIGN §5)."""
    error = _map(status, _body(code) if code else b"")
    assert type(error) is kind
    assert (error.reply.code, error.reply.status) == reply
    assert remedy_words in error.remedy
    assert error.http_status == status
    assert error.code == (code or None)
    if code:
        assert code in error.reply.text
        assert error.request_id == REQUEST_ID


def test_a_size_error_code_wins_over_any_status() -> None:
    """ErrorMessageSizeExceeded is 552 5.3.4 whatever status carries it."""
    error = _map(403, _body("ErrorMessageSizeExceeded"))
    assert (error.reply.code, error.reply.status) == (552, "5.3.4")


def test_a_nested_inner_error_code_is_understood() -> None:
    """Graph may put the specific code in a nested innererror (concepts/errors.md)."""
    body = json.dumps(
        {"error": {"code": "ErrorAccessDenied", "innererror": {"code": "ErrorSendAsDenied"}}}
    ).encode()
    error = _map(403, body)
    assert "Send As" in error.remedy
    assert error.code == "ErrorAccessDenied"


def test_the_request_id_header_wins_over_the_body() -> None:
    """The `request-id` response header is authoritative; the body's copy is the fallback."""
    error = _map(503, _body("ServiceUnavailable"), **{"Request-Id": "from-header"})
    assert error.request_id == "from-header"
    assert "from-header" in error.reply.text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Sat, 01 Mar 2025 12:00:30 GMT", 30.0),
        ("Sat, 01 Mar 2025 11:59:00 GMT", 0.0),  # already past: retry now
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_accepts_delta_seconds_and_http_dates(
    value: str | None, expected: float | None
) -> None:
    """RFC 9110 §10.2.3: delta-seconds or an HTTP-date, against the injected clock."""
    assert parse_retry_after(value, now=_clock) == expected


def test_a_429_carries_retry_after_from_an_http_date() -> None:
    """The parsed delay travels on the TransientDeliveryError for the scheduler."""
    error = _map(429, _body("TooManyRequests"), **{"Retry-After": "Sat, 01 Mar 2025 12:01:00 GMT"})
    assert isinstance(error, TransientDeliveryError)
    assert error.retry_after == 60.0


def test_garbage_retry_after_leaves_the_backoff_to_the_scheduler() -> None:
    """An unusable Retry-After is ignored, not guessed."""
    error = _map(503, b"", **{"retry-after": "whenever"})
    assert isinstance(error, TransientDeliveryError)
    assert error.retry_after is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
        b'{"error": {"code": "ErrorAccess',  # truncated JSON
        b'{"error": "a string, not an object"}',
        b"[1, 2, 3]",
        b"\xff\xfe not utf-8",
    ],
)
def test_non_json_bodies_are_tolerated(body: bytes) -> None:
    """Gateways answer with HTML or nothing; the status alone still decides."""
    error = _map(502, body)
    assert isinstance(error, TransientDeliveryError)
    assert error.code is None
    assert "HTTP 502" in error.reply.text
    assert "<" not in error.message


def test_a_gateway_page_is_reduced_to_its_text() -> None:
    """HTML tags are dropped so the log line stays readable."""
    parsed = parse_graph_error(b"<html><body><h1>Service Unavailable</h1></body></html>")
    assert parsed.message == "Service Unavailable"


def test_graph_messages_are_truncated_to_one_short_line() -> None:
    """Long, multi-line Graph messages become one line of at most 300 characters."""
    error = _map(400, _body("ErrorInvalidRecipients", "line one\r\nline two " + "x" * 1000))
    assert len(error.message) < 400
    assert "\n" not in error.message
    assert "line one line two" in error.message


def test_a_hostile_code_cannot_break_the_smtp_reply_line() -> None:
    """Codes and request ids are reduced to safe characters before entering the reply."""
    body = json.dumps({"error": {"code": "Bad\r\n250 OK", "message": "m"}}).encode()
    error = _map(409, body, **{"request-id": "id\r\nX: y"})
    assert "\r" not in str(error.reply)
    assert "\n" not in str(error.reply)
    assert "Bad250OK" in error.reply.text


def test_an_unexpected_success_status_is_not_treated_as_delivered() -> None:
    """Only 202 means accepted; a 200 or a redirect is retried rather than assumed."""
    for status in (200, 302):
        error = _map(status)
        assert isinstance(error, TransientDeliveryError)
        assert error.reply.status == "4.4.2"


def test_the_graph_knowledge_modules_import_no_http_library() -> None:
    """#10: the error mapping, the AADSTS knowledge, the token backoff and the JWT reading are
    pure; only relay.graph.client and relay.graph.tokens talk HTTP (aiohttp, MSAL, requests)."""
    code = (
        "import sys\n"
        "import relay.graph.errors, relay.graph.aadsts, relay.graph.token_backoff\n"
        "import relay.graph.claims\n"
        "print(sorted(m for m in ('aiohttp', 'yarl', 'msal', 'requests', 'urllib3', 'asyncio',"
        " 'ssl') if m in sys.modules))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert found.stdout.strip() == "[]"
