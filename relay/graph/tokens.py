"""App-only access tokens for Microsoft Graph, one MSAL confidential client per auth object.

Why this module exists: every Graph call needs a bearer token from Entra's client-credentials
flow, and everything that can go wrong with an app registration (wrong or expired secret, unknown
app or tenant, certificate not uploaded, app disabled) surfaces here first. This module is the thin
I/O shell around MSAL: it runs MSAL, and every failure leaves it as one `TransientDeliveryError`
(451 4.7.0) built by `relay.graph.aadsts` with the AADSTS code and the setup step that fixes it,
so no caller ever sees an MSAL, requests or urllib3 exception (`token_failure` is that one
conversion). `test-auth` reads the token's claims with `relay.graph.claims`.

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
- A failed request is remembered per auth object (`relay.graph.token_backoff`): callers that come
  in during the backoff (1 s doubling to 5 min, or the token endpoint's Retry-After) get the
  remembered failure without a request, so an Entra outage costs O(log t) requests, not one per
  delivery attempt. The log says "token requests failing" once, "still failing" at most every
  5 minutes, and "recovered" when a token comes again; the failures in between are DEBUG.
- MSAL speaks HTTP through `relay.graph.transport.PinnedTrustSession`: the auth object's trust
  (`ca_file`) and proxy with the same rules as the Graph client, and nothing taken from the
  environment that could override them (REQUESTS_CA_BUNDLE, ~/.netrc).
"""

from __future__ import annotations

import asyncio
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
from relay.graph.claims import MAIL_SEND_MISSING, TokenCheck, decode_jwt_payload, token_claims
from relay.graph.errors import parse_retry_after
from relay.graph.token_backoff import FailureGate
from relay.graph.transport import PinnedTrustSession, ssl_context_for
from relay.ops.metrics import NULL_METRICS, MetricsSink

__all__ = [
    "TokenProvider",
    "TokenStatus",
    "error_from_exception",
    "token_failure",
]

_LOG = logging.getLogger("relay.tokens")

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
    gate: FailureGate = field(default_factory=FailureGate)


@dataclass(frozen=True, slots=True)
class _Answer:
    """What one trip into MSAL came back with, and the Retry-After of a 429/5xx on the way."""

    result: Any  # MSAL's result dict, None, or the TransientDeliveryError made from an exception
    retry_after: str | None


class TokenProvider:
    """App-only Graph tokens for the configured auth objects (see the module docstring)."""

    def __init__(
        self,
        auth_objects: Mapping[str, AuthObjectConfig],
        *,
        timeout: float = 15.0,
        metrics: MetricsSink = NULL_METRICS,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        """`clock` (wall time) stamps token expiry and the status page; `monotonic` times the
        backoff after failed token requests (relay.graph.token_backoff)."""
        self._states = {name: _State(auth) for name, auth in auth_objects.items()}
        self._timeout = timeout
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
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
        and a fresh token is fetched. Raises TransientDeliveryError (451 4.7.0) on any failure;
        after a failure, callers get it again without a request until the backoff has passed.
        """
        state = self._state(name)
        if stale is None and self._fresh(state):
            # The common case: no lock, no thread hop into MSAL's cache for every message.
            assert state.current is not None
            return state.current
        self._raise_if_blocked(state)
        async with state.lock:
            self._raise_if_blocked(state)  # the caller before us may just have failed
            answer = await self._in_thread(partial(self._acquire, name, state, stale, False))
            return self._token_from(name, state, answer)

    def _raise_if_blocked(self, state: _State) -> None:
        remembered = state.gate.blocked(self._monotonic())
        if remembered is not None:
            raise remembered

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
        """Fetch a fresh token from the identity provider and report what it grants.

        An operator asked: this always makes the request, even during a backoff."""
        state = self._state(name)
        try:
            async with state.lock:
                answer = await self._in_thread(partial(self._acquire, name, state, None, True))
                token = self._token_from(name, state, answer)
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

    def _acquire(self, name: str, state: _State, stale: str | None, fresh: bool) -> _Answer:
        """Runs in a worker thread: MSAL's result dict or a TransientDeliveryError, with the
        Retry-After the session saw on a 429/5xx answer."""
        auth = state.auth
        with state.thread_lock:
            if state.session is not None:
                state.session.retry_after = None
            try:
                app = state.app
                if app is None:
                    app = state.app = self._build_app(state)
                if fresh or (stale is not None and stale == state.current):
                    app.remove_tokens_for_client()
                result: Any = app.acquire_token_for_client(scopes=[auth.effective_scope])
            except _BOUNDARY_ERRORS as exc:
                result = error_from_exception(
                    exc, auth_name=name, authority=auth.authority_url, secret=_secret_of(auth)
                )
            retry_after = state.session.retry_after if state.session is not None else None
            return _Answer(result, retry_after)

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

    def _token_from(self, name: str, state: _State, answer: _Answer) -> str:
        secret = _secret_of(state.auth)
        result = answer.result
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
            lasted = state.gate.succeeded(self._monotonic())
            if lasted is not None:
                _LOG.info("token requests recovered auth_object=%s after %.0fs", name, lasted)
            return token
        elif isinstance(result, dict):
            error = error_from_result(result, auth_name=name, secret=secret)
        else:
            error = error_from_empty_result(auth_name=name)
        self._metrics.token_request(name, ok=False)
        state.status = TokenStatus(
            last_ok=False, last_at=self._clock(), code=error.code, remedy=error.remedy
        )
        self._report(name, state, error, answer.retry_after)
        raise error

    def _report(
        self, name: str, state: _State, error: TransientDeliveryError, retry_after: str | None
    ) -> None:
        """Remember the failure for the backoff; log it only when the state changes."""
        gate = state.gate
        wall = partial(datetime.fromtimestamp, self._clock(), UTC)
        report = gate.failed(error, self._monotonic(), parse_retry_after(retry_after, now=wall))
        level = logging.ERROR if error.alert else logging.WARNING
        what = f"token requests {report}"
        if report is None:  # the state did not change: only for debugging
            level, what = logging.DEBUG, "token request failed"
        _LOG.log(
            level,
            "%s auth_object=%s alert=%s failures=%d answered_from_backoff=%d "
            "next_request_in=%.0fs %s",
            what,
            name,
            error.alert,
            gate.failures,
            gate.answered,
            gate.until - self._monotonic(),
            error.describe(),
        )
        if report == "still failing":
            gate.answered = 0


def _secret_of(auth: AuthObjectConfig) -> str | None:
    credential = auth.credential
    return credential.value if isinstance(credential, ClientSecret) else None
