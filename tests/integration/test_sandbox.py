"""The sandbox behaves like Entra ID and Microsoft Graph on the wire.

Real MSAL (`ConfidentialClientApplication`, `instance_discovery=False`) and a real aiohttp
client talk to the sandbox over real TLS, trusting only the generated CA.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msal
import pytest
import requests  # type: ignore[import-untyped, unused-ignore]
from cryptography.hazmat.primitives import hashes

from relay.sandbox import MAX_REQUEST_BYTES, ReceivedMail, Sandbox
from tests.certificates import SelfSigned, self_signed

TENANT = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
CLIENT = "11111111-2222-3333-4444-555555555555"
SECRET = "s3cret~value"
MAILBOX = "scanner@contoso.com"
ALIAS = "noreply@contoso.com"


# -- helpers --------------------------------------------------------------------------------


class CaBundleHttpClient:
    """The HTTP client MSAL is given: requests, verifying against the sandbox CA on every call.

    REQUESTS_CA_BUNDLE overrides a session-level `verify`, so it must be passed per request.
    """

    def __init__(self, ca_file: Path) -> None:
        self._session = requests.Session()
        self._ca_file = str(ca_file)

    def get(self, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("verify", self._ca_file)
        return self._session.get(url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("verify", self._ca_file)
        return self._session.post(url, **kwargs)

    def close(self) -> None:
        self._session.close()


def acquire_token(
    sandbox: Sandbox,
    credential: object,
    *,
    tenant: str = TENANT,
    client_id: str = CLIENT,
    scope: str | None = None,
    authority_host: str | None = None,
) -> dict[str, Any]:
    """Run MSAL's client-credentials flow against the sandbox (blocking; use a thread)."""
    session = CaBundleHttpClient(sandbox.ca_file)
    try:
        app = msal.ConfidentialClientApplication(
            client_id,
            client_credential=credential,
            authority=f"{authority_host or sandbox.authority_host}/{tenant}",
            instance_discovery=False,
            http_client=session,
        )
        result: dict[str, Any] = app.acquire_token_for_client(
            [scope or f"{sandbox.graph_endpoint}/.default"]
        )
        return result
    finally:
        session.close()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


async def post(
    http: aiohttp.ClientSession,
    url: str,
    data: bytes | str,
    *,
    token: str | None,
    content_type: str = "text/plain",
    extra_headers: dict[str, str] | None = None,
) -> Answer:
    headers = {"Content-Type": content_type, **(extra_headers or {})}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    # A BytesIO payload keeps aiohttp from warning about multi-megabyte bytes bodies.
    payload = io.BytesIO(data) if isinstance(data, bytes) else data
    async with http.post(url, data=payload, headers=headers) as response:
        text = await response.text()
        body = json.loads(text) if text and response.content_type == "application/json" else text
        return Answer(response.status, dict(response.headers), body)


def mime(
    *,
    sender: str | None = MAILBOX,
    to: str = "alice@example.org",
    extra: str = "",
    subject: str = "Scan",
) -> bytes:
    lines = [f"From: {sender}"] if sender else []
    lines += [f"To: {to}", f"Subject: {subject}"]
    if extra:
        lines.append(extra)
    lines += ["", "Hello from the scanner."]
    return "\r\n".join(lines).encode()


def send_url(sandbox: Sandbox, mailbox: str = MAILBOX) -> str:
    return f"{sandbox.graph_endpoint}/v1.0/users/{mailbox}/sendMail"


@pytest.fixture(scope="module")
def certificates() -> tuple[SelfSigned, SelfSigned]:
    """Two distinct self-signed RSA certificates with their keys (RSA key generation is the slow
    part; do it once)."""
    return self_signed("relay test app"), self_signed("relay test app")


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with Sandbox(state_dir=tmp_path / "state", mail_dir=tmp_path / "mail") as box:
        box.add_app(TENANT, CLIENT, secret=SECRET)
        box.add_mailbox(MAILBOX, send_as=[ALIAS.upper()])
        yield box


@pytest.fixture
async def http(sandbox: Sandbox) -> AsyncIterator[aiohttp.ClientSession]:
    tls = ssl.create_default_context(cafile=str(sandbox.ca_file))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as session:
        yield session


@pytest.fixture
def token(sandbox: Sandbox) -> str:
    return sandbox.issue_token(TENANT, CLIENT)


# -- Entra: discovery and tokens ------------------------------------------------------------


async def test_discovery_document_names_the_tenant_token_endpoint(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """OpenID discovery answers with the endpoints MSAL reads, under the sandbox's origin."""
    url = f"{sandbox.authority_host}/{TENANT}/v2.0/.well-known/openid-configuration"
    async with http.get(url) as response:
        assert response.status == 200
        document = await response.json()
    assert document["token_endpoint"] == f"{sandbox.authority_host}/{TENANT}/oauth2/v2.0/token"
    assert document["authorization_endpoint"].endswith(f"/{TENANT}/oauth2/v2.0/authorize")
    assert document["issuer"] == f"{sandbox.authority_host}/{TENANT}/v2.0"
    assert document["jwks_uri"].startswith(sandbox.authority_host)


async def test_discovery_of_unknown_tenant_is_entra_error_90002(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """An unknown tenant gets Entra's 400 invalid_tenant JSON with AADSTS90002."""
    url = f"{sandbox.authority_host}/nosuchtenant/v2.0/.well-known/openid-configuration"
    async with http.get(url, headers={"client-request-id": "abc-123"}) as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"] == "invalid_tenant"
    assert body["error_description"].startswith("AADSTS90002: Tenant 'nosuchtenant' not found.")
    assert body["error_codes"] == [90002]
    assert body["correlation_id"] == "abc-123"
    assert {"timestamp", "trace_id", "error_uri"} <= body.keys()


async def test_msal_gets_a_token_with_a_client_secret(sandbox: Sandbox) -> None:
    """The secret flow yields a Bearer token with the configured lifetime; both counted."""
    result = await asyncio.to_thread(acquire_token, sandbox, SECRET)
    assert result["token_type"] == "Bearer"
    assert result["expires_in"] == 3599
    assert result["access_token"].count(".") == 2
    assert (sandbox.token_requests, sandbox.tokens_issued) == (1, 1)


@pytest.mark.parametrize("thumbprint_kind", ["sha1", "sha256"])
async def test_msal_gets_a_token_with_a_certificate(
    sandbox: Sandbox,
    certificates: tuple[SelfSigned, SelfSigned],
    thumbprint_kind: str,
) -> None:
    """A JWT client assertion signed with the registered certificate's key is accepted, whether
    MSAL names it by SHA-1 `x5t` (RS256) or by SHA-256 `x5t#S256` (PS256)."""
    registered = certificates[0]
    sandbox.add_app(TENANT, CLIENT, certificate_pem=registered.cert_pem)
    credential: dict[str, Any] = {"private_key": registered.key_pem.decode()}
    if thumbprint_kind == "sha1":
        thumbprint = registered.certificate.fingerprint(hashes.SHA1()).hex()  # noqa: S303
        credential["thumbprint"] = thumbprint
    else:
        credential["public_certificate"] = registered.cert_pem.decode()
    result = await asyncio.to_thread(acquire_token, sandbox, credential)
    assert "access_token" in result, result


async def test_assertion_signed_by_another_key_is_aadsts700027(
    sandbox: Sandbox, certificates: tuple[SelfSigned, SelfSigned]
) -> None:
    """A certificate the app registration does not hold is refused with AADSTS700027."""
    registered, other = certificates
    sandbox.add_app(TENANT, CLIENT, certificate_pem=registered.cert_pem)
    credential = {
        "private_key": other.key_pem.decode(),
        "public_certificate": other.cert_pem.decode(),
    }
    result = await asyncio.to_thread(acquire_token, sandbox, credential)
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [700027]
    assert "The key was not found." in result["error_description"]


async def test_msal_reports_unknown_tenant(sandbox: Sandbox) -> None:
    """MSAL turns discovery's AADSTS90002 into a ValueError; Entra's JSON (with the code) is
    the exception's context."""
    with pytest.raises(ValueError, match="Unable to get authority configuration") as caught:
        await asyncio.to_thread(acquire_token, sandbox, SECRET, tenant="contoso.example")
    assert "AADSTS90002" in str(caught.value.__context__)


@pytest.mark.parametrize(
    ("client_id", "secret", "scope", "error", "code"),
    [
        ("99999999-0000-0000-0000-000000000000", SECRET, None, "unauthorized_client", 700016),
        (CLIENT, "wrong-secret", None, "invalid_client", 7000215),
        (CLIENT, SECRET, "https://graph.microsoft.com/Mail.Send", "invalid_scope", 1002012),
        (CLIENT, SECRET, "https://management.azure.com/.default", "invalid_scope", 70011),
    ],
    ids=["unknown-app", "wrong-secret", "scope-without-default", "foreign-resource"],
)
async def test_token_errors_reach_msal_with_their_aadsts_code(
    sandbox: Sandbox, client_id: str, secret: str, scope: str | None, error: str, code: int
) -> None:
    """Each refusal comes back in MSAL's result with Entra's error and `error_codes`."""
    result = await asyncio.to_thread(
        acquire_token, sandbox, secret, client_id=client_id, scope=scope
    )
    assert result["error"] == error
    assert result["error_codes"] == [code]
    assert result["error_description"].startswith(f"AADSTS{code}: ")
    assert sandbox.token_requests == 1
    assert sandbox.tokens_issued == 0


async def test_graph_default_scope_is_accepted(sandbox: Sandbox) -> None:
    """The production scope https://graph.microsoft.com/.default works against the sandbox."""
    result = await asyncio.to_thread(
        acquire_token, sandbox, SECRET, scope="https://graph.microsoft.com/.default"
    )
    assert "access_token" in result


async def test_token_endpoint_error_has_entra_shape(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """A raw wrong-secret POST gets 401 and the full Entra error object."""
    answer = await post(
        http,
        f"{sandbox.authority_host}/{TENANT}/oauth2/v2.0/token",
        f"grant_type=client_credentials&client_id={CLIENT}&client_secret=nope"
        "&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default",
        token=None,
        content_type="application/x-www-form-urlencoded",
        extra_headers={"client-request-id": "corr-1"},
    )
    assert answer.status == 401
    assert answer.body["error"] == "invalid_client"
    assert answer.body["error_codes"] == [7000215]
    assert "\r\nTrace ID: " in answer.body["error_description"]
    assert answer.body["correlation_id"] == "corr-1"
    assert answer.headers["client-request-id"] == "corr-1"


async def test_client_secret_basic_is_accepted(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """RFC 6749 §2.3.1 HTTP Basic client authentication works as well as the form field."""
    basic = base64.b64encode(f"{CLIENT}:{SECRET}".encode()).decode()
    answer = await post(
        http,
        f"{sandbox.authority_host}/{TENANT}/oauth2/v2.0/token",
        "grant_type=client_credentials&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default",
        token=None,
        content_type="application/x-www-form-urlencoded",
        extra_headers={"Authorization": f"Basic {basic}"},
    )
    assert answer.status == 200
    assert answer.body["token_type"] == "Bearer"


# -- Graph: sendMail success --------------------------------------------------------------


async def test_msal_token_sends_mime_and_graph_records_it(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """End to end: MSAL token, base64 MIME to sendMail, 202 with Graph's headers, recorded."""
    result = await asyncio.to_thread(acquire_token, sandbox, SECRET)
    message = mime(
        to="Alice <Alice@Example.org>, team: bob@example.org, carol@example.org;",
        extra="Cc: =?utf-8?q?D=C3=A4ve?= <dave@example.org>\r\nBcc: eve@example.org",
    )
    answer = await post(
        http,
        send_url(sandbox, MAILBOX.upper()),
        base64.encodebytes(message),  # line-wrapped base64 is fine
        token=result["access_token"],
        extra_headers={"client-request-id": "client-42"},
    )
    assert answer.status == 202, answer.body
    assert answer.body == ""
    assert answer.headers["client-request-id"] == "client-42"
    assert "Date" in answer.headers
    [mail] = await sandbox.wait_for_mail(1)
    assert mail.request_id == answer.headers["request-id"]
    assert mail.mailbox == MAILBOX
    assert mail.kind == "mime"
    assert mail.mime == message
    assert mail.recipients == (
        "alice@example.org",
        "bob@example.org",
        "carol@example.org",
        "dave@example.org",
        "eve@example.org",
    )
    assert mail.from_address == MAILBOX
    assert mail.save_to_sent_items is True
    assert sandbox.graph_requests == 1


@pytest.mark.parametrize("sender", [ALIAS, ALIAS.title(), None], ids=["alias", "case", "absent"])
async def test_send_as_rights_and_missing_from_are_accepted(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str, sender: str | None
) -> None:
    """From may be the mailbox, an address it has Send-As on (any case), or absent."""
    answer = await post(http, send_url(sandbox), base64.b64encode(mime(sender=sender)), token=token)
    assert answer.status == 202, answer.body
    [mail] = sandbox.received
    assert mail.from_address == (sender or MAILBOX).lower()


async def test_json_message_is_accepted_with_its_options(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str
) -> None:
    """The JSON form is recorded with its recipients, sender and saveToSentItems."""
    document = {
        "message": {
            "subject": "Report",
            "body": {"contentType": "HTML", "content": "<p>hi</p>"},
            "from": {"emailAddress": {"address": ALIAS}},
            "toRecipients": [{"emailAddress": {"address": "A@example.org", "name": "A"}}],
            "bccRecipients": [{"emailAddress": {"address": "b@example.org"}}],
            "internetMessageHeaders": [{"name": "X-Relay-Queue-Id", "value": "q1"}],
        },
        "saveToSentItems": False,
    }
    answer = await post(
        http, send_url(sandbox), json.dumps(document), token=token, content_type="application/json"
    )
    assert answer.status == 202, answer.body
    [mail] = sandbox.received
    assert (mail.kind, mail.mime, mail.json_body) == ("json", None, document)
    assert mail.recipients == ("a@example.org", "b@example.org")
    assert mail.from_address == ALIAS
    assert mail.save_to_sent_items is False


async def test_open_mailboxes_accept_any_address(tmp_path: Path) -> None:
    """With open_mailboxes, an unknown address is a licensed mailbox sending as itself."""
    async with Sandbox(state_dir=tmp_path, open_mailboxes=True) as box:
        box.add_app(TENANT, CLIENT, secret=SECRET)
        tls = ssl.create_default_context(cafile=str(box.ca_file))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http:
            answer = await post(
                http,
                send_url(box, "anyone@fabrikam.example"),
                base64.b64encode(mime(sender="anyone@fabrikam.example")),
                token=box.issue_token(TENANT, CLIENT),
            )
    assert answer.status == 202, answer.body


async def test_sandbox_answers_under_localhost_too(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """The certificate covers `localhost`, and a relay configured with that name for both the
    authority and the Graph endpoint gets tokens and sends mail."""
    origin = f"https://localhost:{sandbox.port}"
    result = await asyncio.to_thread(
        acquire_token, sandbox, SECRET, authority_host=origin, scope=f"{origin}/.default"
    )
    answer = await post(
        http,
        f"{origin}/v1.0/users/{MAILBOX}/sendMail",
        base64.b64encode(mime()),
        token=result["access_token"],
    )
    assert answer.status == 202, answer.body


async def test_sandbox_can_listen_on_ipv6_loopback(tmp_path: Path) -> None:
    """host="::1" gives bracketed URLs that MSAL and aiohttp can use over TLS."""
    try:
        box = Sandbox(host="::1", state_dir=tmp_path)
        await box.start()
    except OSError:  # pragma: no cover - machines without IPv6 loopback
        pytest.skip("no IPv6 loopback here")
    try:
        assert box.authority_host == f"https://[::1]:{box.port}"
        box.add_app(TENANT, CLIENT, secret=SECRET)
        box.add_mailbox(MAILBOX)
        result = await asyncio.to_thread(acquire_token, box, SECRET)
        tls = ssl.create_default_context(cafile=str(box.ca_file))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http:
            answer = await post(
                http, send_url(box), base64.b64encode(mime()), token=result["access_token"]
            )
        assert answer.status == 202, answer.body
    finally:
        await box.stop()


# -- Graph: refusals -----------------------------------------------------------------------


def graph_error(answer: Answer) -> str:
    """The Graph error code, after checking the error envelope is Graph's."""
    inner = answer.body["error"]["innerError"]
    assert inner["request-id"] == answer.headers["request-id"]
    assert inner["client-request-id"]
    datetime.datetime.strptime(inner["date"], "%Y-%m-%dT%H:%M:%S")
    assert answer.body["error"]["message"]
    code: str = answer.body["error"]["code"]
    return code


@pytest.mark.parametrize(
    "token_kind", ["missing", "garbage", "expired", "revoked", "app-deleted", "tampered"]
)
async def test_bad_bearer_tokens_get_401_invalid_authentication_token(
    sandbox: Sandbox, http: aiohttp.ClientSession, token_kind: str
) -> None:
    """Graph refuses any token that is absent, malformed, expired, revoked, orphaned or forged."""
    token: str | None = sandbox.issue_token(TENANT, CLIENT)
    if token_kind == "missing":
        token = None
    elif token_kind == "garbage":
        token = "not-a-jwt"
    elif token_kind == "expired":
        token = sandbox.issue_token(TENANT, CLIENT, expires_in=-60)
    elif token_kind == "revoked":
        sandbox.revoke_tokens()
    elif token_kind == "app-deleted":
        sandbox.remove_app(TENANT, CLIENT)
    elif token_kind == "tampered":
        assert token is not None
        head, _, sig = token.split(".")
        claims = {"tid": TENANT, "appid": CLIENT, "roles": ["Mail.Send"], "exp": 2**40}
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        token = f"{head}.{forged}.{sig}"
    answer = await post(http, send_url(sandbox), base64.b64encode(mime()), token=token)
    assert answer.status == 401
    assert graph_error(answer) == "InvalidAuthenticationToken"
    assert answer.headers["WWW-Authenticate"].startswith("Bearer ")
    assert sandbox.received == []


async def test_expired_token_message_names_expiry(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """An expired token is told so, as Graph does."""
    token = sandbox.issue_token(TENANT, CLIENT, expires_in=-1)
    answer = await post(http, send_url(sandbox), base64.b64encode(mime()), token=token)
    assert answer.body["error"]["message"] == "Access token has expired or is not yet valid."


async def test_revocation_spares_tokens_issued_afterwards(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """revoke_tokens() kills tokens issued so far; a fresh token works (the relay's retry)."""
    sandbox.revoke_tokens()
    fresh = await asyncio.to_thread(acquire_token, sandbox, SECRET)
    answer = await post(
        http, send_url(sandbox), base64.b64encode(mime()), token=fresh["access_token"]
    )
    assert answer.status == 202


async def test_token_without_mail_send_role_gets_403_access_denied(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """No admin-consented Mail.Send application permission -> 403 ErrorAccessDenied."""
    sandbox.add_app(TENANT, CLIENT, secret=SECRET, roles=())
    answer = await post(
        http, send_url(sandbox), base64.b64encode(mime()), token=sandbox.issue_token(TENANT, CLIENT)
    )
    assert answer.status == 403
    assert graph_error(answer) == "ErrorAccessDenied"
    assert answer.body["error"]["message"] == "Access is denied. Check credentials and try again."


@pytest.mark.parametrize(
    ("mailbox", "licensed", "code"),
    [
        ("ghost@contoso.com", None, "ErrorInvalidUser"),
        ("not-an-address", None, "ErrorInvalidUser"),
        ("former@contoso.com", False, "MailboxNotEnabledForRESTAPI"),
    ],
)
async def test_missing_or_unlicensed_mailbox_gets_404(
    sandbox: Sandbox,
    http: aiohttp.ClientSession,
    token: str,
    mailbox: str,
    licensed: bool | None,
    code: str,
) -> None:
    """Unknown users are ErrorInvalidUser; mailboxes without a licence MailboxNotEnabled..."""
    if licensed is not None:
        sandbox.add_mailbox(mailbox, licensed=licensed)
    answer = await post(
        http, send_url(sandbox, mailbox), base64.b64encode(mime(sender=mailbox)), token=token
    )
    assert answer.status == 404
    assert graph_error(answer) == code


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"this is not base64!", "ErrorMimeContentInvalidBase64String"),
        (base64.urlsafe_b64encode(b"\xfb\xff" * 30), "ErrorMimeContentInvalidBase64String"),
        (base64.b64encode(b"no header block at all"), "ErrorMimeContentInvalid"),
        (base64.b64encode(mime(to="undisclosed-recipients:;")), "ErrorInvalidRecipients"),
        (base64.b64encode(mime(to="alice at example.org")), "ErrorInvalidRecipients"),
    ],
    ids=["not-base64", "base64url-alphabet", "no-headers", "no-recipients", "bad-recipient"],
)
async def test_invalid_mime_requests_get_400(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str, body: bytes, code: str
) -> None:
    """Graph's MIME validation: base64, a header block, and resolvable recipients."""
    answer = await post(http, send_url(sandbox), body, token=token)
    assert answer.status == 400
    assert graph_error(answer) == code


async def test_mime_from_without_send_as_right_gets_403(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str
) -> None:
    """A From address the mailbox may not send as is ErrorSendAsDenied."""
    answer = await post(
        http, send_url(sandbox), base64.b64encode(mime(sender="ceo@contoso.com")), token=token
    )
    assert answer.status == 403
    assert graph_error(answer) == "ErrorSendAsDenied"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"toRecipients": []}, "ErrorInvalidRecipients"),
        (
            {
                "toRecipients": [{"emailAddress": {"address": "a@example.org"}}],
                "internetMessageHeaders": [{"name": "Reply-To", "value": "x@example.org"}],
            },
            "InvalidInternetMessageHeader",
        ),
        (
            {
                "toRecipients": [{"emailAddress": {"address": "a@example.org"}}],
                "internetMessageHeaders": [{"name": f"x-h{i}", "value": "v"} for i in range(6)],
            },
            "InvalidInternetMessageHeaderCollection",
        ),
        (
            {
                "toRecipients": [{"emailAddress": {"address": "a@example.org"}}],
                "from": {"emailAddress": {"address": "ceo@contoso.com"}},
            },
            "ErrorSendAsDenied",
        ),
    ],
    ids=["no-recipients", "non-x-header", "six-headers", "send-as-denied"],
)
async def test_invalid_json_messages_are_refused(
    sandbox: Sandbox,
    http: aiohttp.ClientSession,
    token: str,
    message: dict[str, Any],
    code: str,
) -> None:
    """The JSON form enforces recipients, x- headers (at most 5) and Send-As."""
    answer = await post(
        http,
        send_url(sandbox),
        json.dumps({"message": message}),
        token=token,
        content_type="application/json",
    )
    assert answer.status == (403 if code == "ErrorSendAsDenied" else 400)
    assert graph_error(answer) == code


async def test_unreadable_json_is_bad_request(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str
) -> None:
    """Malformed JSON gets Graph's 'Unable to read JSON request payload' BadRequest."""
    answer = await post(
        http, send_url(sandbox), "{nope", token=token, content_type="application/json"
    )
    assert answer.status == 400
    assert graph_error(answer) == "BadRequest"
    assert answer.body["error"]["message"].startswith("Unable to read JSON request payload.")


async def test_request_body_over_4_mib_gets_413(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str
) -> None:
    """Exactly 4 MiB of request body is accepted; one byte more is 413."""
    header = mime()
    raw_size = MAX_REQUEST_BYTES // 4 * 3  # base64 of this is exactly MAX_REQUEST_BYTES
    fitting = header + b"x" * (raw_size - len(header))
    body = base64.b64encode(fitting)
    assert len(body) == MAX_REQUEST_BYTES
    ok = await post(http, send_url(sandbox), body, token=token)
    assert ok.status == 202, ok.body
    too_big = await post(http, send_url(sandbox), body + b"\n", token=token)
    assert too_big.status == 413
    assert graph_error(too_big) == "RequestEntityTooLarge"
    assert len(sandbox.received) == 1


async def test_unknown_path_and_wrong_method_get_graph_errors(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """Unknown resources are 404 and wrong methods 405, both with Graph's error JSON."""
    async with http.get(f"{sandbox.graph_endpoint}/v1.0/nowhere") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "ResourceNotFound"
    async with http.get(send_url(sandbox)) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert "request-id" in response.headers


async def test_me_endpoint_is_refused_for_app_only_tokens(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str
) -> None:
    """/me/sendMail needs a delegated token; the relay's app-only token gets 400."""
    url = f"{sandbox.graph_endpoint}/v1.0/me/sendMail"
    answer = await post(http, url, base64.b64encode(mime()), token=token)
    assert answer.status == 400
    assert "delegated" in answer.body["error"]["message"]


# -- concurrency and faults -------------------------------------------------------------------


async def test_fifth_concurrent_request_to_a_mailbox_is_throttled(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str
) -> None:
    """With 6 simultaneous sendMail calls to one mailbox, 4 are admitted and 2 get 429
    ApplicationThrottled (MailboxConcurrency) with Retry-After."""
    sandbox.faults.hold_graph()
    body = base64.b64encode(mime())
    tasks = [
        asyncio.create_task(post(http, send_url(sandbox), body, token=token)) for _ in range(6)
    ]
    await sandbox.wait_until(
        lambda: sandbox.graph_statuses[429] == 2 and sandbox.in_flight.get(MAILBOX) == 4
    )
    sandbox.faults.release_graph()
    answers = await asyncio.gather(*tasks)
    assert sorted(a.status for a in answers) == [202] * 4 + [429] * 2
    throttled = [a for a in answers if a.status == 429]
    for answer in throttled:
        assert graph_error(answer) == "ApplicationThrottled"
        assert "MailboxConcurrency" in answer.body["error"]["message"]
        assert int(answer.headers["Retry-After"]) >= 1
    assert sandbox.max_concurrency == {MAILBOX: 4}
    assert sandbox.in_flight == {}


async def test_graph_latency_delays_every_answer(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str
) -> None:
    """graph_latency makes each accepted sendMail take at least that long."""
    sandbox.faults.graph_latency(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await post(http, send_url(sandbox), base64.b64encode(mime()), token=token)
    assert answer.status == 202
    assert loop.time() - started >= 0.19  # asyncio may wake a clock tick early


async def test_scripted_graph_failures_come_in_order_then_stop(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str
) -> None:
    """fail_graph answers are consumed in order, carry Retry-After, and then Graph recovers."""
    sandbox.faults.fail_graph(503, retry_after="7")
    sandbox.faults.fail_graph(429, "ApplicationThrottled", "slow down", retry_after="2", times=2)
    body = base64.b64encode(mime())
    answers = [await post(http, send_url(sandbox), body, token=token) for _ in range(4)]
    assert [a.status for a in answers] == [503, 429, 429, 202]
    assert graph_error(answers[0]) == "ServiceUnavailable"
    assert answers[0].headers["Retry-After"] == "7"
    assert answers[1].body["error"]["message"] == "slow down"
    assert answers[2].headers["Retry-After"] == "2"
    assert len(sandbox.received) == 1


async def test_mailbox_scoped_fault_spares_other_mailboxes(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str
) -> None:
    """A fault aimed at one mailbox waits for a request to that mailbox."""
    sandbox.add_mailbox("printer@contoso.com")
    sandbox.faults.fail_graph(500, mailbox="PRINTER@contoso.com")
    first = await post(http, send_url(sandbox), base64.b64encode(mime()), token=token)
    second = await post(
        http,
        send_url(sandbox, "printer@contoso.com"),
        base64.b64encode(mime(sender="printer@contoso.com")),
        token=token,
    )
    assert (first.status, second.status) == (202, 500)


async def test_abort_fault_drops_the_connection(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str
) -> None:
    """fail_graph(status=0) hangs up without an HTTP answer; nothing is recorded."""
    sandbox.faults.fail_graph(0)
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(http, send_url(sandbox), base64.b64encode(mime()), token=token)
    assert sandbox.received == []
    assert sandbox.graph_statuses[0] == 1


async def test_token_endpoint_outage_and_scripted_failures(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """While down, Entra answers 503 with a gateway page; fail_token scripts single failures;
    every POST is counted, only successes issue tokens."""
    url = f"{sandbox.authority_host}/{TENANT}/oauth2/v2.0/token"
    form = (
        f"grant_type=client_credentials&client_id={CLIENT}&client_secret={SECRET}"
        "&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default"
    )
    kind = "application/x-www-form-urlencoded"
    sandbox.faults.token_endpoint_down(True)
    down = await post(http, url, form, token=None, content_type=kind)
    assert down.status == 503
    assert down.headers["Content-Type"].startswith("text/html")
    sandbox.faults.token_endpoint_down(False)
    sandbox.faults.fail_token(502)
    scripted = await post(http, url, form, token=None, content_type=kind)
    recovered = await post(http, url, form, token=None, content_type=kind)
    assert (scripted.status, recovered.status) == (502, 200)
    assert (sandbox.token_requests, sandbox.tokens_issued) == (3, 1)


async def test_msal_raises_while_entra_is_down(sandbox: Sandbox) -> None:
    """MSAL cannot even discover the tenant during an outage; it raises rather than returning."""
    sandbox.faults.token_endpoint_down(True)
    with pytest.raises(Exception, match="503"):
        await asyncio.to_thread(acquire_token, sandbox, SECRET)


# -- observation ---------------------------------------------------------------------------


async def test_mail_dir_gets_each_message_and_an_escaped_index(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str, tmp_path: Path
) -> None:
    """Accepted messages land in mail_dir as .eml/.json files listed by index.html."""
    await post(
        http, send_url(sandbox), base64.b64encode(mime(subject="<script>x</script>")), token=token
    )
    document = {"message": {"toRecipients": [{"emailAddress": {"address": "a@example.org"}}]}}
    await post(
        http, send_url(sandbox), json.dumps(document), token=token, content_type="application/json"
    )
    await sandbox.wait_for_mail(2)
    mail_dir = tmp_path / "mail"
    names = sorted(p.name for p in mail_dir.iterdir())
    assert names == [f"0001-{MAILBOX}.eml", f"0002-{MAILBOX}.json", "index.html"]
    assert (mail_dir / f"0001-{MAILBOX}.eml").read_bytes() == mime(subject="<script>x</script>")
    assert json.loads((mail_dir / f"0002-{MAILBOX}.json").read_text()) == document
    page = (mail_dir / "index.html").read_text()
    assert "&lt;script&gt;x&lt;/script&gt;" in page
    assert "<script>" not in page
    assert f'href="0001-{MAILBOX}.eml"' in page


async def test_mail_dir_has_an_index_at_start_and_survives_restarts(tmp_path: Path) -> None:
    """index.html exists before any mail; a second run numbers after the first run's files."""
    mail_dir = tmp_path / "mail"
    for expected in ("0001", "0002"):
        async with Sandbox(state_dir=tmp_path / "state", mail_dir=mail_dir) as box:
            assert "No mail yet." in (mail_dir / "index.html").read_text()
            box.add_app(TENANT, CLIENT, secret=SECRET)
            box.add_mailbox(MAILBOX)
            tls = ssl.create_default_context(cafile=str(box.ca_file))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http:
                token = box.issue_token(TENANT, CLIENT)
                await post(http, send_url(box), base64.b64encode(mime()), token=token)
        assert (mail_dir / f"{expected}-{MAILBOX}.eml").exists()


async def test_wait_for_mail_times_out(sandbox: Sandbox) -> None:
    """Waiting for mail that never comes raises TimeoutError after the timeout."""
    with pytest.raises(TimeoutError):
        await sandbox.wait_for_mail(1, timeout=0.05)


async def test_received_mail_is_immutable(
    sandbox: Sandbox, http: aiohttp.ClientSession, token: str
) -> None:
    """ReceivedMail is a frozen value."""
    await post(http, send_url(sandbox), base64.b64encode(mime()), token=token)
    [mail] = await sandbox.wait_for_mail(1)
    assert isinstance(mail, ReceivedMail)
    with pytest.raises(AttributeError):
        mail.mailbox = "x"  # type: ignore[misc]
