"""App-only access tokens for Microsoft Graph, one MSAL confidential client per auth object.

Why this module exists: every Graph call needs a bearer token from Entra's client-credentials
flow, and everything that can go wrong with an app registration (wrong or expired secret, unknown
app or tenant, certificate not uploaded, app disabled) surfaces here first. This module is the thin
I/O shell around MSAL: it runs MSAL, and every failure leaves it as one `TransientDeliveryError`
(451 4.7.0) built by `relay.aadsts` with the AADSTS code and the setup step that fixes it, so no
caller ever sees an MSAL, requests or urllib3 exception. It also reads a token's claims for
`test-auth`.

Theory of operation
-------------------
- One `msal.ConfidentialClientApplication` per auth object, built lazily on first use (building it
  already performs OpenID discovery against the authority, so it can fail like a token request and
  is retried on the next call). Each has its own in-memory `msal.TokenCache`.
- MSAL is synchronous: calls run on the provider's own worker threads under a per-auth-object
  `asyncio.Lock`, so any number of concurrent callers cause at most one identity-provider round
  trip; the others are then served from MSAL's cache (`token_source == "cache"`). MSAL treats a
  cached token with less than five minutes left as expired and fetches a new one
  (`msal/application.py`, "expires_in < 5*60"). A `threading.Lock` per auth object keeps MSAL and
  its `requests.Session` to one thread even when an awaiting coroutine was cancelled while its
  thread still runs.
- After Graph answers 401, the caller passes the refused token as `stale=`; if it is still the one
  cached, it is dropped (`remove_tokens_for_client`) and a fresh one is acquired. A caller that
  arrives after someone else refreshed simply gets the new token from the cache.
- MSAL speaks HTTP through `relay.transport.PinnedTrustSession`: the auth object's trust
  (`ca_file`) and proxy with the same rules as the Graph client, and nothing taken from the
  environment that could override them (REQUESTS_CA_BUNDLE, ~/.netrc).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import msal
import requests
from msal.exceptions import MsalError, MsalServiceError

from relay.config.schema import AuthObjectConfig, ClientSecret
from relay.core.errors import TransientDeliveryError
from relay.graph.aadsts import (
    TokenFailure,
    TokenFailureKind,
    error_from_empty_result,
    error_from_failure,
    error_from_result,
)
from relay.graph.transport import PinnedTrustSession, ssl_context_for
from relay.ops.metrics import NULL_METRICS, MetricsSink

__all__ = [
    "TokenCheck",
    "TokenClaims",
    "TokenProvider",
    "TokenStatus",
    "decode_jwt_payload",
    "error_from_exception",
    "token_claims",
    "token_failure",
]

_LOG = logging.getLogger("relay.tokens")

MAIL_SEND_MISSING = (
    "Mail.Send role missing -> grant the Mail.Send *application* permission (API permissions > "
    "Add a permission > Microsoft Graph > Application permissions) and grant admin consent"
)
# What MSAL and requests raise for network, TLS, HTTP and discovery failures; anything else is a
# bug and propagates (the SMTP layer answers 451 4.3.0 for it, DESIGN §8).
_BOUNDARY_ERRORS = (requests.exceptions.RequestException, MsalError, ValueError, OSError)
# The order matters: requests' exceptions are OSErrors, and its SSLError and ProxyError are
# ConnectionErrors; the first class that matches decides the kind.
_KINDS: tuple[tuple[type[BaseException], TokenFailureKind], ...] = (
    (requests.exceptions.SSLError, "tls"),
    (requests.exceptions.ProxyError, "proxy"),
    (requests.exceptions.Timeout, "timeout"),
    (requests.exceptions.RequestException, "unreachable"),
    (MsalServiceError, "service"),  # MSAL raises it for a 5xx from the token or discovery endpoint
    (ValueError, "unreadable"),  # incl. msal/authority.py's "Unable to get authority configuration"
    (OSError, "local"),  # ca_file missing or unreadable
)


# --- the boundary: MSAL's and requests' exceptions become our values, once --------------


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def token_failure(exc: BaseException) -> TokenFailure:
    """What MSAL or `requests` raised, as a value for relay.graph.aadsts to map."""
    kind: TokenFailureKind = next((k for t, k in _KINDS if isinstance(exc, t)), "other")
    text = " <- ".join(str(e) for e in _chain(exc))
    return TokenFailure(kind=kind, type_name=type(exc).__name__, text=text)


def error_from_exception(
    exc: BaseException, *, auth_name: str, authority: str, secret: str | None = None
) -> TransientDeliveryError:
    """Convert what MSAL or `requests` raised while talking to the authority into our error."""
    return error_from_failure(
        token_failure(exc), auth_name=auth_name, authority=authority, secret=secret
    )


# --- JWT inspection for test-auth ----------------------------------------------------------


def decode_jwt_payload(token: str) -> dict[str, Any]:
    """The claims of a JWS compact token, WITHOUT verifying its signature (diagnostics only)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a signed JWT (expected three dot-separated parts)")
    segment = parts[1]
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the JWT payload is not base64url-encoded JSON") from exc
    if not isinstance(payload, dict):
        raise ValueError("the JWT payload is not a JSON object")
    return payload


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What test-auth reports about an access token."""

    roles: tuple[str, ...]
    tenant_id: str | None
    app_id: str | None
    audience: str | None
    expires_at: datetime | None

    @property
    def has_mail_send(self) -> bool:
        return "Mail.Send" in self.roles


def token_claims(payload: Mapping[str, Any]) -> TokenClaims:
    """Pick the claims we report: roles, tid, appid (v1) or azp (v2), aud, exp."""
    roles = payload.get("roles")
    exp = payload.get("exp")
    app_id = payload.get("appid") or payload.get("azp")
    return TokenClaims(
        roles=tuple(str(r) for r in roles) if isinstance(roles, list) else (),
        tenant_id=str(payload["tid"]) if payload.get("tid") else None,
        app_id=str(app_id) if app_id else None,
        audience=str(payload["aud"]) if payload.get("aud") else None,
        expires_at=datetime.fromtimestamp(exp, UTC) if isinstance(exp, int | float) else None,
    )


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """The outcome of `TokenProvider.check`: `ok` means a token with the Mail.Send role."""

    auth_name: str
    token_acquired: bool
    code: str | None = None
    description: str = ""
    remedy: str = ""
    claims: TokenClaims | None = None
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.token_acquired and not self.problems


# --- the provider --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenStatus:
    """The last token outcome of one auth object, for readiness and the status page."""

    last_ok: bool | None = None  # None: no token was needed yet
    last_at: float | None = None  # wall-clock time of the last outcome
    expires_at: float | None = None  # of the last token the identity provider issued
    code: str | None = None  # AADSTS (or MSAL) code of the last failure
    remedy: str = ""  # the setup step that fixes the last failure


# MSAL treats a cached token with less than 5 minutes left as expired (application.py).
REFRESH_MARGIN = 300.0


@dataclass(slots=True)
class _State:
    auth: AuthObjectConfig
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    thread_lock: threading.Lock = field(default_factory=threading.Lock)
    app: Any = None  # msal.ConfidentialClientApplication, built lazily
    session: PinnedTrustSession | None = None
    current: str | None = None
    token_requests: int = 0
    status: TokenStatus = field(default_factory=TokenStatus)


class TokenProvider:
    """App-only Graph tokens for the configured auth objects (see the module docstring)."""

    def __init__(
        self,
        auth_objects: Mapping[str, AuthObjectConfig],
        *,
        timeout: float = 15.0,
        metrics: MetricsSink = NULL_METRICS,
        clock: Callable[[], float] = time.time,
    ):
        self._states = {name: _State(auth) for name, auth in auth_objects.items()}
        self._timeout = timeout
        self._metrics = metrics
        self._clock = clock
        self._executor: ThreadPoolExecutor | None = None

    async def _in_thread(self, call: Callable[[], Any]) -> Any:
        """Run a blocking MSAL call on the provider's own threads.

        Not the loop's default executor: other blocking work (or, in tests, blocking SMTP
        clients) filling that pool must never stall token acquisition.
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=max(2, len(self._states)), thread_name_prefix="msal"
            )
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    @property
    def token_requests(self) -> Mapping[str, int]:
        """Identity-provider round trips that returned a token, per auth object."""
        return {name: state.token_requests for name, state in self._states.items()}

    def status(self) -> Mapping[str, TokenStatus]:
        """The last token outcome per auth object (cache hits included). Never blocks."""
        return {name: state.status for name, state in self._states.items()}

    async def get_token(self, name: str, *, stale: str | None = None) -> str:
        """A valid access token for auth object `name`.

        `stale` is a token Graph refused with 401: if it is still the cached one, it is dropped
        and a fresh token is fetched. Raises TransientDeliveryError (451 4.7.0) on any failure.
        """
        state = self._state(name)
        if stale is None and self._fresh(state):
            # The common case: no lock, no thread hop into MSAL's cache for every message.
            assert state.current is not None
            return state.current
        async with state.lock:
            result = await self._in_thread(partial(self._acquire, name, state, stale, False))
            return self._token_from(name, state, result)

    def _fresh(self, state: _State) -> bool:
        """The held token has more left than MSAL's own refresh margin (5 minutes)."""
        expires_at = state.status.expires_at
        return (
            state.current is not None
            and state.status.last_ok is True
            and expires_at is not None
            and expires_at - self._clock() > REFRESH_MARGIN
        )

    async def check(self, name: str) -> TokenCheck:
        """Fetch a fresh token from the identity provider and report what it grants."""
        state = self._state(name)
        try:
            async with state.lock:
                result = await self._in_thread(partial(self._acquire, name, state, None, True))
                token = self._token_from(name, state, result)
        except TransientDeliveryError as exc:
            return TokenCheck(
                auth_name=name,
                token_acquired=False,
                code=exc.code,
                description=exc.message,
                remedy=exc.remedy,
            )
        try:
            claims = token_claims(decode_jwt_payload(token))
        except ValueError as exc:
            return TokenCheck(
                auth_name=name,
                token_acquired=True,
                description=f"the token is opaque, its roles cannot be shown ({exc})",
            )
        problems = () if claims.has_mail_send else (MAIL_SEND_MISSING,)
        return TokenCheck(auth_name=name, token_acquired=True, claims=claims, problems=problems)

    def close(self) -> None:
        """Close the HTTP sessions; apps are rebuilt (with new sessions) if used again.

        Does not wait for a token request running in a worker thread (that could block the
        loop for the whole timeout); such a request fails and is reported as transient.
        """
        for state in self._states.values():
            session, state.session, state.app, state.current = state.session, None, None, None
            if session is not None:
                session.close()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    # -- internals ------------------------------------------------------------------------

    def _state(self, name: str) -> _State:
        try:
            return self._states[name]
        except KeyError:
            raise KeyError(f"unknown auth object {name!r}") from None

    def _acquire(self, name: str, state: _State, stale: str | None, fresh: bool) -> Any:
        """Runs in a worker thread. Returns MSAL's result dict or a TransientDeliveryError."""
        auth = state.auth
        with state.thread_lock:
            try:
                app = state.app
                if app is None:
                    app = state.app = self._build_app(state)
                if fresh or (stale is not None and stale == state.current):
                    app.remove_tokens_for_client()
                return app.acquire_token_for_client(scopes=[auth.effective_scope])
            except _BOUNDARY_ERRORS as exc:
                return error_from_exception(
                    exc, auth_name=name, authority=auth.authority_url, secret=_secret_of(auth)
                )

    def _build_app(self, state: _State) -> Any:
        auth = state.auth
        if state.session is None:
            state.session = PinnedTrustSession(
                ssl_context_for(auth.ca_file), proxy=auth.proxy, timeout=self._timeout
            )
        credential = auth.credential
        client_credential: str | dict[str, str] = (
            credential.value
            if isinstance(credential, ClientSecret)
            else {
                # With public_certificate and no thumbprint, MSAL >= 1.35 signs the assertion with
                # PS256 and an x5t#S256 header (msal/application.py, _build_client).
                "private_key": credential.private_key_pem,
                "public_certificate": credential.certificate_pem,
            }
        )
        return msal.ConfidentialClientApplication(
            auth.client_id,
            client_credential=client_credential,
            authority=auth.authority_url,
            http_client=state.session,
            # Instance discovery only knows Microsoft's own hosts (DESIGN §10).
            instance_discovery=None if auth.is_microsoft_cloud else False,
            token_cache=msal.TokenCache(),
        )

    def _token_from(self, name: str, state: _State, result: Any) -> str:
        secret = _secret_of(state.auth)
        if isinstance(result, TransientDeliveryError):
            error = result
        elif isinstance(result, dict) and isinstance(result.get("access_token"), str):
            token: str = result["access_token"]
            now = self._clock()
            expires_at = state.status.expires_at
            if result.get("token_source") == "identity_provider":
                state.token_requests += 1
                self._metrics.token_request(name, ok=True)
                expires_in = result.get("expires_in")
                if isinstance(expires_in, int | float):
                    expires_at = now + expires_in
                _LOG.info(
                    "token acquired auth_object=%s expires_in=%s source=identity_provider",
                    name,
                    expires_in,
                )
            state.current = token
            state.status = TokenStatus(last_ok=True, last_at=now, expires_at=expires_at)
            return token
        elif isinstance(result, dict):
            error = error_from_result(result, auth_name=name, secret=secret)
        else:
            error = error_from_empty_result(auth_name=name)
        self._metrics.token_request(name, ok=False)
        state.status = TokenStatus(
            last_ok=False, last_at=self._clock(), code=error.code, remedy=error.remedy
        )
        _LOG.log(
            logging.ERROR if error.alert else logging.WARNING,
            "token request failed auth_object=%s alert=%s %s",
            name,
            error.alert,
            error.describe(),
        )
        raise error


def _secret_of(auth: AuthObjectConfig) -> str | None:
    credential = auth.credential
    return credential.value if isinstance(credential, ClientSecret) else None
