"""The pure parts of the token path: AADSTS remedies and error conversion (relay.graph.aadsts),
JWT payload decoding (relay.graph.claims), the backoff after failed token requests
(relay.graph.token_backoff), trust and proxy rules (relay.graph.transport)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from msal.exceptions import MsalServiceError

from relay.core.errors import TransientDeliveryError
from relay.graph.aadsts import aadsts_code, error_from_result, remedy_for
from relay.graph.claims import MAIL_SEND_MISSING, decode_jwt_payload, token_claims
from relay.graph.token_backoff import FailureGate
from relay.graph.tokens import error_from_exception
from relay.graph.transport import proxy_for, ssl_context_for
from tests.certificates import self_signed

SECRET = "Zx8Q~very.secret.value~000"
AUTHORITY = "https://login.example.test/00000000-0000-0000-0000-000000000001"


def _jwt(payload: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}.c2ln"


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("AADSTS7000215", ["Certificates & secrets", "Value", "Secret ID"]),
        ("AADSTS7000222", ["expired", "Certificates & secrets"]),
        ("AADSTS700016", ["client_id", "tenant_id", "Application (client) ID"]),
        ("AADSTS90002", ["Directory (tenant) ID", "cloud"]),
        ("AADSTS700027", ["upload the certificate"]),
        ("AADSTS700024", ["clock", "certificate"]),
        ("AADSTS1002012", ["https://graph.microsoft.com/.default"]),
        ("AADSTS70011", ["https://graph.microsoft.com/.default"]),
        ("AADSTS7000112", ["disabled", "Enterprise applications"]),
        ("AADSTS500011", ["resource", "https://graph.microsoft.com/.default"]),
    ],
)
def test_each_known_aadsts_code_names_the_setup_step_that_fixes_it(
    code: str, words: list[str]
) -> None:
    """The remedy for a known code mentions where in the setup the fix is made."""
    remedy = remedy_for(code)
    for word in words:
        assert word in remedy


def test_an_unknown_aadsts_code_points_to_the_error_lookup_page() -> None:
    """Unknown codes still get an actionable remedy: Entra's own error lookup."""
    assert "https://login.microsoftonline.com/error?code=123456" in remedy_for("AADSTS123456")


@pytest.mark.parametrize(
    ("codes", "description", "expected"),
    [
        ([7000215], "", "AADSTS7000215"),
        (None, "AADSTS90002: Tenant 'x' not found.", "AADSTS90002"),
        ([], "no code here", None),
        ("7000215", "AADSTS700016: app", "AADSTS700016"),  # error_codes must be a list
    ],
)
def test_the_aadsts_code_comes_from_error_codes_else_from_the_description(
    codes: object, description: str, expected: str | None
) -> None:
    """`error_codes` wins; the "AADSTSnnnn:" prefix of the description is the fallback."""
    assert aadsts_code(codes, description) == expected


def test_an_invalid_client_result_becomes_a_451_470_alert_with_remedy_and_no_secret() -> None:
    """Entra's invalid_client answer maps to 451 4.7.0, alert, AADSTS code, and hides the secret."""
    result = {
        "error": "invalid_client",
        "error_description": f"AADSTS7000215: Invalid client secret {SECRET}.\r\nTrace ID: 1",
        "error_codes": [7000215],
    }
    error = error_from_result(result, auth_name="contoso", secret=SECRET)
    assert (error.reply.code, error.reply.status) == (451, "4.7.0")
    assert "AADSTS7000215" in error.reply.text
    assert error.code == "AADSTS7000215"
    assert error.alert is True
    assert "Certificates & secrets" in error.remedy
    assert SECRET not in error.message
    assert SECRET not in error.describe()
    assert "\n" not in error.message


def test_a_temporarily_unavailable_result_is_transient_without_alert() -> None:
    """Entra's own "try again" errors do not page an administrator."""
    result = {"error": "temporarily_unavailable", "error_description": "AADSTS50033: retry"}
    error = error_from_result(result, auth_name="contoso")
    assert error.alert is False
    assert error.code == "AADSTS50033"


def _discovery_failure(body: str, status: int = 400) -> ValueError:
    """What msal/authority.py raises when the discovery document answers 4xx."""
    outer = ValueError("Unable to get authority configuration for x.")
    outer.__context__ = ValueError(
        f"OIDC Discovery failed on x. HTTP status: {status}, Error: {body}"
    )
    return outer


def test_discovery_of_an_unknown_tenant_maps_to_aadsts90002_with_alert() -> None:
    """A 400 AADSTS90002 discovery answer (hidden in MSAL's ValueError chain) is found."""
    exc = _discovery_failure('{"error":"invalid_tenant","error_description":"AADSTS90002: x"}')
    error = error_from_exception(exc, auth_name="contoso", authority=AUTHORITY)
    assert error.code == "AADSTS90002"
    assert error.alert is True
    assert "Directory (tenant) ID" in error.remedy
    assert AUTHORITY in error.remedy


def test_a_discovery_4xx_without_code_still_suggests_checking_the_tenant() -> None:
    """A 404 from a wrong authority_host is a setup error, reported with the tenant remedy."""
    error = error_from_exception(
        _discovery_failure("<html>not found</html>", 404), auth_name="c", authority=AUTHORITY
    )
    assert error.code is None
    assert error.alert is True
    assert "tenant_id" in error.remedy


@pytest.mark.parametrize(
    ("exc", "alert", "words"),
    [
        (requests.exceptions.ConnectionError("refused"), False, "cannot reach"),
        (requests.exceptions.ConnectTimeout("slow"), False, "cannot reach"),
        (requests.exceptions.ProxyError("407"), False, "proxy"),
        (requests.exceptions.SSLError("CERTIFICATE_VERIFY_FAILED"), True, "ca_file"),
        (MsalServiceError("HTTP Error: 503", error=None, error_description=None), False, "Entra"),
        (ValueError("Expecting value: line 1 column 1"), False, "not Entra's JSON"),
        (FileNotFoundError("ca.pem"), True, "ca_file"),
    ],
)
def test_transport_failures_become_451_470_with_a_remedy(
    exc: BaseException, alert: bool, words: str
) -> None:
    """Network, TLS, 5xx and garbage answers are transient; only lasting setup faults alert."""
    error = error_from_exception(exc, auth_name="contoso", authority=AUTHORITY)
    assert isinstance(error, TransientDeliveryError)
    assert (error.reply.code, error.reply.status) == (451, "4.7.0")
    assert error.alert is alert
    assert words in error.remedy


def test_a_5xx_from_entra_records_the_http_status() -> None:
    """MSAL's "HTTP Error: 503" becomes http_status=503 for the log."""
    exc = MsalServiceError("HTTP Error: 503", error=None, error_description=None)
    assert error_from_exception(exc, auth_name="c", authority=AUTHORITY).http_status == 503


def test_the_secret_never_appears_in_a_converted_exception() -> None:
    """Even if a library echoed the secret, the message hides it."""
    exc = requests.exceptions.ConnectionError(f"failed posting client_secret={SECRET}")
    error = error_from_exception(exc, auth_name="c", authority=AUTHORITY, secret=SECRET)
    assert SECRET not in error.describe()


def test_the_jwt_payload_is_decoded_without_padding_or_verification() -> None:
    """The middle segment is base64url JSON; missing padding is tolerated."""
    payload = {"roles": ["Mail.Send"], "tid": "t", "appid": "a", "exp": 1_900_000_000}
    assert decode_jwt_payload(_jwt(payload)) == payload


@pytest.mark.parametrize("token", ["opaque-token", "a.b", "a.!!!.c", f"a.{'W10'}.c"])
def test_a_token_that_is_not_a_readable_jwt_is_a_value_error(token: str) -> None:
    """Opaque, truncated, non-base64 or non-object payloads are reported, not crashed on."""
    with pytest.raises(ValueError, match="JWT"):
        decode_jwt_payload(token)


def test_token_claims_report_roles_tenant_app_and_expiry() -> None:
    """v1 tokens carry appid; the expiry becomes an aware UTC datetime."""
    claims = token_claims({"roles": ["Mail.Send"], "tid": "t", "appid": "a", "exp": 1_900_000_000})
    assert claims.roles == ("Mail.Send",)
    assert (claims.tenant_id, claims.app_id) == ("t", "a")
    assert claims.expires_at == datetime.fromtimestamp(1_900_000_000, UTC)
    assert claims.has_mail_send


def test_token_claims_use_azp_for_v2_tokens_and_notice_a_missing_mail_send_role() -> None:
    """v2 tokens carry azp; no roles claim at all means no application permission."""
    claims = token_claims({"azp": "app", "tid": "t"})
    assert claims.app_id == "app"
    assert claims.roles == ()
    assert not claims.has_mail_send
    assert "admin consent" in MAIL_SEND_MISSING
    assert "application" in MAIL_SEND_MISSING


def test_the_trust_context_adds_ca_file_to_the_default_anchors(tmp_path: Path) -> None:
    """ca_file adds its anchors to the system/certifi ones instead of replacing them."""
    extra = tmp_path / "extra.pem"
    extra.write_bytes(self_signed("relay test extra CA", key_type="ec", ca=True, days=1).cert_pem)
    baseline = ssl_context_for(None).get_ca_certs()
    widened = ssl_context_for(extra).get_ca_certs()
    assert baseline  # certifi is always loaded, whatever the system store looks like
    assert len(widened) == len(baseline) + 1
    assert any(
        ("commonName", "relay test extra CA") in rdn for ca in widened for rdn in ca["subject"]
    )


def test_a_missing_ca_file_is_an_os_error_for_the_callers_to_convert(tmp_path: Path) -> None:
    """Both clients turn this OSError into a transient alert naming ca_file."""
    with pytest.raises(FileNotFoundError):
        ssl_context_for(tmp_path / "missing.pem")


def test_the_auth_objects_proxy_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A configured proxy is used as given, whatever HTTPS_PROXY or NO_PROXY say."""
    monkeypatch.setenv("HTTPS_PROXY", "http://env-proxy:3128")
    monkeypatch.setenv("NO_PROXY", "graph.example.test")
    assert proxy_for("https://graph.example.test/v1.0", "http://mine:8080") == "http://mine:8080"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HTTPS_PROXY": "http://p:3128"}, "http://p:3128"),
        ({"https_proxy": "p:3128"}, "http://p:3128"),  # scheme-less, as curl accepts it
        ({"ALL_PROXY": "http://all:1"}, "http://all:1"),
        ({"HTTP_PROXY": "http://plain:1"}, None),  # not for https:// URLs
        ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "example.test"}, None),
        ({"HTTPS_PROXY": "http://p:3128", "no_proxy": "other.test"}, "http://p:3128"),
        ({}, None),
    ],
)
def test_the_environment_proxy_follows_https_proxy_and_no_proxy(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], expected: str | None
) -> None:
    """Without a configured proxy, the usual variables decide (requests' rules)."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert proxy_for("https://graph.example.test/v1.0/users", None) == expected


# --- the backoff after failed token requests (relay.graph.token_backoff) -----------------


def _outage(code: str = "temporarily_unavailable") -> TransientDeliveryError:
    return TransientDeliveryError("Entra is away", code=code, remedy="wait")


def test_the_backoff_doubles_from_one_second_up_to_five_minutes() -> None:
    """1, 2, 4 ... 256, then 300 s for as long as the failures go on."""
    gate = FailureGate()
    waits = []
    for _ in range(12):
        gate.failed(_outage(), now=0.0)
        waits.append(gate.until)
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]


def test_retry_after_lengthens_the_wait_but_never_past_five_minutes() -> None:
    gate = FailureGate()
    gate.failed(_outage(), now=0.0, retry_after=30.0)
    assert gate.until == 30.0
    gate.failed(_outage(), now=0.0, retry_after=86400.0)
    assert gate.until == 300.0
    gate.failed(_outage(), now=0.0, retry_after=0.5)  # shorter than the backoff: backoff wins
    assert gate.until == 4.0


def test_callers_in_the_window_get_a_copy_of_the_failure_with_the_wait_left() -> None:
    gate = FailureGate()
    original = _outage()
    gate.failed(original, now=10.0)
    copy = gate.blocked(10.25)
    assert copy is not None
    assert copy is not original  # raising one instance from many tasks would chain tracebacks
    assert (copy.code, copy.remedy, copy.reply) == (original.code, original.remedy, original.reply)
    assert copy.retry_after == 0.75
    assert "remembered" in copy.message
    assert gate.blocked(11.0) is None  # the window is over: the next caller asks


def test_reports_come_once_per_state_change() -> None:
    """failing once; still failing at most every 5 minutes; another code is a new failing;
    a success after failures returns how long they lasted, and only once."""
    gate = FailureGate()
    assert gate.succeeded(now=0.0) is None
    assert gate.failed(_outage(), now=0.0) == "failing"
    assert gate.failed(_outage(), now=100.0) is None
    assert gate.failed(_outage(), now=299.0) is None
    assert gate.failed(_outage(), now=300.0) == "still failing"
    assert gate.failed(_outage(), now=400.0) is None
    assert gate.failed(_outage("AADSTS7000215"), now=401.0) == "failing"
    assert gate.succeeded(now=500.0) == 500.0
    assert gate.succeeded(now=501.0) is None
    assert gate.blocked(501.0) is None
