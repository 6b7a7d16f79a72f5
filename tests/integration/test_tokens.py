"""TokenProvider with real MSAL against the sandbox's Entra over TLS (DESIGN §10)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from relay.config.schema import AuthObjectConfig
from relay.core.errors import TransientDeliveryError
from relay.graph.tokens import TokenProvider
from relay.sandbox import Sandbox
from tests.certificates import SelfSigned, self_signed
from tests.sandbox_auth import CLIENT, SECRET, TENANT, auth_for

SandboxFactory = Callable[..., Awaitable[Sandbox]]


@pytest.fixture
async def start_sandbox(tmp_path: Path) -> AsyncIterator[SandboxFactory]:
    """Start sandboxes with chosen options; all are stopped after the test."""
    started: list[Sandbox] = []

    async def start(**options: Any) -> Sandbox:
        sandbox = Sandbox(state_dir=tmp_path / f"sandbox{len(started)}", **options)
        await sandbox.start()
        started.append(sandbox)
        return sandbox

    yield start
    for sandbox in started:
        await sandbox.stop()


@pytest.fixture
async def sandbox(start_sandbox: SandboxFactory) -> Sandbox:
    sandbox = await start_sandbox()
    sandbox.add_app(TENANT, CLIENT, secret=SECRET)
    return sandbox


@pytest.fixture
def providers() -> Iterator[Callable[..., TokenProvider]]:
    """Build TokenProviders for one auth object named "contoso"; all are closed afterwards."""
    made: list[TokenProvider] = []

    def make(auth: AuthObjectConfig, **options: Any) -> TokenProvider:
        provider = TokenProvider({"contoso": auth}, **options)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
def provider(
    sandbox: Sandbox, providers: Callable[..., TokenProvider], tmp_path: Path
) -> TokenProvider:
    """A TokenProvider for the default sandbox app, which signs in with its client secret."""
    return providers(auth_for(sandbox, tmp_path))


class Ticks:
    """A monotonic clock that only the test moves (the token backoff reads it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_200_concurrent_callers_cause_one_token_request(
    sandbox: Sandbox, provider: TokenProvider
) -> None:
    """Single flight: one identity-provider round trip, everyone else served from the cache."""
    tokens = await asyncio.gather(*(provider.get_token("contoso") for _ in range(200)))
    assert len(set(tokens)) == 1
    assert sandbox.token_requests == 1
    assert provider.token_requests == {"contoso": 1}


async def test_a_token_with_an_hour_left_is_served_from_msal_cache(
    sandbox: Sandbox, provider: TokenProvider
) -> None:
    """Sequential calls reuse the cached token while it has more than five minutes left."""
    first = await provider.get_token("contoso")
    assert await provider.get_token("contoso") == first
    assert sandbox.token_requests == 1


async def test_a_token_msal_considers_expired_is_fetched_again(
    start_sandbox: SandboxFactory, providers: Callable[..., TokenProvider], tmp_path: Path
) -> None:
    """MSAL treats a cached token with under 5 minutes left as expired (no sleeping needed)."""
    sandbox = await start_sandbox(token_lifetime=60)
    sandbox.add_app(TENANT, CLIENT, secret=SECRET)
    provider = providers(auth_for(sandbox, tmp_path))
    first = await provider.get_token("contoso")
    second = await provider.get_token("contoso")
    assert first != second
    assert sandbox.token_requests == 2
    assert provider.token_requests == {"contoso": 2}


async def test_a_stale_token_is_replaced_once_however_many_callers_report_it(
    sandbox: Sandbox, provider: TokenProvider
) -> None:
    """After Graph's 401, stale= drops the cached token; later reporters get the new one."""
    refused = await provider.get_token("contoso")
    fresh = await asyncio.gather(*(provider.get_token("contoso", stale=refused) for _ in range(50)))
    assert len(set(fresh)) == 1
    assert fresh[0] != refused
    assert sandbox.token_requests == 2


async def test_a_wrong_secret_is_451_470_with_aadsts7000215_and_its_remedy(
    sandbox: Sandbox,
    providers: Callable[..., TokenProvider],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Entra's invalid_client: retried (451), alerting, with the secret-copying remedy."""
    wrong = "wrong~Secret.Value_9876543210"
    provider = providers(auth_for(sandbox, tmp_path, client_secret=wrong))
    with caplog.at_level(logging.DEBUG), pytest.raises(TransientDeliveryError) as caught:
        await provider.get_token("contoso")
    error = caught.value
    assert (error.reply.code, error.reply.status) == (451, "4.7.0")
    assert error.code == "AADSTS7000215"
    assert error.alert is True
    assert "Secret ID" in error.remedy
    assert wrong not in error.describe()
    assert wrong not in str(error.reply)
    assert all(wrong not in record.getMessage() for record in caplog.records)
    assert any(
        "AADSTS7000215" in r.getMessage() for r in caplog.records if r.name == "relay.tokens"
    )


async def test_an_unknown_application_is_aadsts700016(
    sandbox: Sandbox, providers: Callable[..., TokenProvider], tmp_path: Path
) -> None:
    """A client_id not registered in the tenant names the Application (client) ID fix."""
    other = "99999999-bbbb-cccc-dddd-eeeeeeeeeeee"
    provider = providers(auth_for(sandbox, tmp_path, client_id=other))
    with pytest.raises(TransientDeliveryError) as caught:
        await provider.get_token("contoso")
    assert caught.value.code == "AADSTS700016"
    assert caught.value.alert is True
    assert "Application (client) ID" in caught.value.remedy


async def test_an_unknown_tenant_is_aadsts90002_from_openid_discovery(
    sandbox: Sandbox, providers: Callable[..., TokenProvider], tmp_path: Path
) -> None:
    """Discovery answers 400 AADSTS90002; MSAL's ValueError is mapped to the tenant remedy."""
    unknown = "22222222-2222-3333-4444-555555555555"
    provider = providers(auth_for(sandbox, tmp_path, tenant_id=unknown))
    with pytest.raises(TransientDeliveryError) as caught:
        await provider.get_token("contoso")
    assert caught.value.code == "AADSTS90002"
    assert caught.value.alert is True
    assert (caught.value.reply.code, caught.value.reply.status) == (451, "4.7.0")
    assert "Directory (tenant) ID" in caught.value.remedy


def _certificate_auth(sandbox: Sandbox, tmp_path: Path, signer: SelfSigned) -> AuthObjectConfig:
    """The auth object with a certificate credential instead of the secret: MSAL signs its
    client assertions with `signer`'s key."""
    cert_file, key_file = signer.write(tmp_path)
    return auth_for(
        sandbox,
        tmp_path,
        client_secret=None,
        certificate_file=str(cert_file),
        private_key_file=str(key_file),
    )


async def test_a_certificate_credential_gets_a_token(
    start_sandbox: SandboxFactory, providers: Callable[..., TokenProvider], tmp_path: Path
) -> None:
    """MSAL signs a client assertion with the private key; the sandbox checks it (x5t#S256)."""
    sandbox = await start_sandbox()
    app_certificate = self_signed("relay-app")
    sandbox.add_app(TENANT, CLIENT, certificate_pem=app_certificate.cert_pem)
    provider = providers(_certificate_auth(sandbox, tmp_path, app_certificate))
    assert await provider.get_token("contoso")
    assert sandbox.token_requests == 1


async def test_a_certificate_not_uploaded_to_the_app_is_aadsts700027(
    start_sandbox: SandboxFactory, providers: Callable[..., TokenProvider], tmp_path: Path
) -> None:
    """Signing with a certificate the app registration does not hold names the upload step."""
    sandbox = await start_sandbox()
    sandbox.add_app(TENANT, CLIENT, certificate_pem=self_signed("registered").cert_pem)
    auth = _certificate_auth(sandbox, tmp_path, self_signed("other"))
    with pytest.raises(TransientDeliveryError) as caught:
        await providers(auth).get_token("contoso")
    assert caught.value.code == "AADSTS700027"
    assert "upload the certificate" in caught.value.remedy


async def test_an_entra_outage_is_transient_without_alert_and_recovers(
    sandbox: Sandbox, providers: Callable[..., TokenProvider], tmp_path: Path
) -> None:
    """Discovery and token endpoint answer 503: retry later; once Entra is back (and the
    first backoff second has passed), it works."""
    ticks = Ticks()
    provider = providers(auth_for(sandbox, tmp_path), monotonic=ticks)
    sandbox.faults.token_endpoint_down(True)
    with pytest.raises(TransientDeliveryError) as caught:
        await provider.get_token("contoso")
    assert (caught.value.reply.code, caught.value.reply.status) == (451, "4.7.0")
    assert caught.value.alert is False
    assert caught.value.http_status == 503
    sandbox.faults.token_endpoint_down(False)
    ticks.advance(1.0)
    assert await provider.get_token("contoso")


async def test_a_5xx_from_the_token_endpoint_is_transient(
    sandbox: Sandbox, provider: TokenProvider
) -> None:
    """A gateway's non-JSON 503 on the token request itself is a plain transient failure."""
    refused = await provider.get_token("contoso")
    sandbox.faults.fail_token(503)
    with pytest.raises(TransientDeliveryError) as caught:
        await provider.get_token("contoso", stale=refused)
    assert caught.value.alert is False
    assert caught.value.http_status == 503


async def test_an_unreachable_token_endpoint_is_transient(
    providers: Callable[..., TokenProvider], tmp_path: Path
) -> None:
    """Nothing listening: 451 4.7.0 naming the network, no alert."""
    auth = AuthObjectConfig.model_validate(
        {
            "tenant_id": TENANT,
            "client_id": CLIENT,
            "client_secret": SECRET,
            "authority_host": f"https://127.0.0.1:{_closed_port()}",
            "graph_endpoint": f"https://127.0.0.1:{_closed_port()}",
        },
        context={"environ": {}, "base_dir": tmp_path},
    )
    with pytest.raises(TransientDeliveryError) as caught:
        await providers(auth, timeout=5.0).get_token("contoso")
    assert caught.value.alert is False
    assert "cannot reach" in caught.value.remedy


async def test_ca_file_is_trusted_even_when_requests_ca_bundle_names_another_bundle(
    sandbox: Sandbox,
    providers: Callable[..., TokenProvider],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """REQUESTS_CA_BUNDLE would replace a session's verify; our adapter ignores it."""
    unrelated = tmp_path / "unrelated.pem"
    unrelated.write_bytes(self_signed("unrelated-ca", ca=True).cert_pem)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(unrelated))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(unrelated))
    assert await providers(auth_for(sandbox, tmp_path)).get_token("contoso")


async def test_the_environment_cannot_widen_trust_without_ca_file(
    sandbox: Sandbox,
    providers: Callable[..., TokenProvider],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without ca_file the sandbox CA is untrusted, even if REQUESTS_CA_BUNDLE names it."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(sandbox.ca_file))
    provider = providers(auth_for(sandbox, tmp_path, ca_file=None))
    with pytest.raises(TransientDeliveryError) as caught:
        await provider.get_token("contoso")
    assert caught.value.alert is True
    assert "ca_file" in caught.value.remedy
    assert sandbox.token_requests == 0


async def test_the_auth_objects_proxy_is_used(
    sandbox: Sandbox, providers: Callable[..., TokenProvider], tmp_path: Path
) -> None:
    """auth.proxy routes MSAL's requests; a dead proxy is a transient network failure."""
    auth = auth_for(sandbox, tmp_path, proxy=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(TransientDeliveryError) as caught:
        await providers(auth).get_token("contoso")
    assert "proxy" in caught.value.message
    assert sandbox.token_requests == 0


async def test_https_proxy_and_no_proxy_from_the_environment_are_honoured(
    sandbox: Sandbox,
    providers: Callable[..., TokenProvider],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without auth.proxy, HTTPS_PROXY applies, and NO_PROXY exempts hosts from it."""
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(TransientDeliveryError):
        await providers(auth_for(sandbox, tmp_path)).get_token("contoso")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert await providers(auth_for(sandbox, tmp_path)).get_token("contoso")


async def test_check_reports_the_roles_tenant_app_and_expiry_of_a_fresh_token(
    sandbox: Sandbox, provider: TokenProvider
) -> None:
    """test-auth: always a new token from Entra, decoded to show what admin consent granted."""
    await provider.get_token("contoso")
    check = await provider.check("contoso")
    assert check.ok
    assert check.claims is not None
    assert "Mail.Send" in check.claims.roles
    assert check.claims.tenant_id == TENANT
    assert check.claims.app_id == CLIENT
    assert check.claims.expires_at is not None
    assert check.claims.expires_at > datetime.now(UTC)
    assert sandbox.token_requests == 2  # check() did not use the cached token


async def test_check_flags_a_missing_mail_send_role(
    start_sandbox: SandboxFactory, providers: Callable[..., TokenProvider], tmp_path: Path
) -> None:
    """A token without the Mail.Send application role is acquired but not ok."""
    sandbox = await start_sandbox()
    sandbox.add_app(TENANT, CLIENT, secret=SECRET, roles=("User.Read.All",))
    check = await providers(auth_for(sandbox, tmp_path)).check("contoso")
    assert check.token_acquired
    assert not check.ok
    assert check.claims is not None
    assert check.claims.roles == ("User.Read.All",)
    assert any("Mail.Send role missing" in problem for problem in check.problems)


async def test_check_reports_the_aadsts_code_description_and_remedy_of_a_failure(
    sandbox: Sandbox, providers: Callable[..., TokenProvider], tmp_path: Path
) -> None:
    """A failed check returns (not raises) what test-auth prints."""
    wrong = "wrong~Secret.Value_9876543210"
    check = await providers(auth_for(sandbox, tmp_path, client_secret=wrong)).check("contoso")
    assert not check.token_acquired
    assert not check.ok
    assert check.code == "AADSTS7000215"
    assert "Invalid client secret" in check.description
    assert "Secret ID" in check.remedy
    assert wrong not in check.description


async def test_tokens_and_secrets_never_reach_the_log(
    sandbox: Sandbox,
    providers: Callable[..., TokenProvider],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Even at debug level, relay.tokens logs neither the access token nor the secret."""
    with caplog.at_level(logging.DEBUG, logger="relay.tokens"):
        token = await providers(auth_for(sandbox, tmp_path)).get_token("contoso")
    ours = [r.getMessage() for r in caplog.records if r.name == "relay.tokens"]
    assert ours
    assert all(token not in line and SECRET not in line for line in ours)


async def test_an_unknown_auth_object_name_is_a_key_error(provider: TokenProvider) -> None:
    """Routes are validated against auth_objects, so an unknown name is a programming error."""
    with pytest.raises(KeyError, match="nope"):
        await provider.get_token("nope")


# --- #11 item 6: no token storms during an Entra outage -------------------------------------


async def _fails(provider: TokenProvider) -> TransientDeliveryError:
    with pytest.raises(TransientDeliveryError) as caught:
        await provider.get_token("contoso")
    return caught.value


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


@pytest.fixture
def backed_off(
    sandbox: Sandbox, providers: Callable[..., TokenProvider], tmp_path: Path, ticks: Ticks
) -> TokenProvider:
    """The default provider, with the backoff timed by `ticks`."""
    return providers(auth_for(sandbox, tmp_path), monotonic=ticks)


async def test_callers_during_the_backoff_get_the_remembered_failure_without_a_request(
    sandbox: Sandbox, backed_off: TokenProvider, ticks: Ticks
) -> None:
    """After a failed request, the next second's 50 callers are answered from memory; the
    failure they get says how long is left, for the queue's scheduler."""
    sandbox.faults.token_endpoint_down(True)
    await _fails(backed_off)
    asked = sandbox.entra_requests
    outcomes = await asyncio.gather(
        *(backed_off.get_token("contoso") for _ in range(50)), return_exceptions=True
    )
    assert all(isinstance(o, TransientDeliveryError) for o in outcomes)
    assert sandbox.entra_requests == asked
    remembered = outcomes[0]
    assert isinstance(remembered, TransientDeliveryError)
    assert str(remembered.reply).startswith("451 4.7.0")
    assert remembered.retry_after == pytest.approx(1.0)
    ticks.advance(1.0)
    await _fails(backed_off)
    assert sandbox.entra_requests > asked


async def test_the_backoff_doubles_with_each_failed_request(
    sandbox: Sandbox, backed_off: TokenProvider, ticks: Ticks
) -> None:
    """1 s, 2 s, 4 s ...: one minute of an outage costs about log2(60) requests, not one per
    delivery attempt."""
    sandbox.faults.token_endpoint_down(True)
    requests_made = 0
    for _ in range(600):  # an attempt every 0.1 s for a minute
        before = sandbox.entra_requests
        await _fails(backed_off)
        requests_made += sandbox.entra_requests > before
        ticks.advance(0.1)
    assert 5 <= requests_made <= 7


async def test_retry_after_from_the_token_endpoint_is_honoured(
    sandbox: Sandbox, backed_off: TokenProvider, ticks: Ticks
) -> None:
    """Entra's 503 with Retry-After: 30 keeps everyone from asking for 30 s, not 1 s."""
    sandbox.faults.token_endpoint_down(True, retry_after="30")
    assert (await _fails(backed_off)).retry_after is None  # the request's own failure
    asked = sandbox.entra_requests
    ticks.advance(29.0)
    assert (await _fails(backed_off)).retry_after == pytest.approx(1.0)
    assert sandbox.entra_requests == asked
    ticks.advance(1.0)
    await _fails(backed_off)
    assert sandbox.entra_requests > asked


async def test_a_dropped_connection_outage_is_remembered_like_a_503(
    sandbox: Sandbox, backed_off: TokenProvider, ticks: Ticks
) -> None:
    """Entra's host gone (connections dropped without an answer): 451 4.7.0 naming the network,
    and the same backoff."""
    sandbox.faults.token_endpoint_down(True, abort=True)
    failure = await _fails(backed_off)
    assert "cannot reach" in failure.remedy
    asked = sandbox.entra_requests
    await _fails(backed_off)
    assert sandbox.entra_requests == asked


async def test_an_outage_is_logged_once_as_failing_then_every_5_minutes_then_recovered(
    sandbox: Sandbox,
    backed_off: TokenProvider,
    ticks: Ticks,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One line per state change: failing, still failing (at most every 5 min), recovered;
    the failures in between are DEBUG only."""
    caplog.set_level(logging.INFO, logger="relay.tokens")
    sandbox.faults.token_endpoint_down(True)
    for _ in range(40):  # 4 minutes, an attempt every 6 s
        await _fails(backed_off)
        ticks.advance(6.0)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1
    assert lines[0].startswith("token requests failing auth_object=contoso")
    ticks.advance(300.0)
    await _fails(backed_off)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2
    assert lines[1].startswith("token requests still failing auth_object=contoso")
    sandbox.faults.token_endpoint_down(False)
    ticks.advance(300.0)
    assert await backed_off.get_token("contoso")
    (recovered,) = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert recovered.levelno == logging.INFO


async def test_test_auth_asks_even_during_the_backoff(
    sandbox: Sandbox, backed_off: TokenProvider
) -> None:
    """`check` is an operator pressing "test": it always makes the request, and a success
    ends the failing state for everyone."""
    sandbox.faults.token_endpoint_down(True)
    await _fails(backed_off)
    sandbox.faults.token_endpoint_down(False)
    assert (await backed_off.check("contoso")).ok
    assert await backed_off.get_token("contoso")
