"""SMTP AUTH (RFC 4954): the PLAIN and LOGIN mechanisms over TLS against argon2id hashes.

Why this module exists: DESIGN §8 lets a client prove who it is with a username and password
instead of (or on top of) its source network. The password is the one secret a client sends us,
so its whole path lives here (hashing in `relay.passwords`), and nothing on that path logs it or
puts it in an exception.

Theory of operation
- Hashes. `clients[].password_hash` is an argon2id PHC string printed by `hash-password` with
  `HASH_PARAMETERS`. Verification reads the cost from the stored string, so hashes made with
  other parameters keep working when the defaults change. Hashing and the command live in
  `relay.passwords`; this module re-exports them.
- Mechanisms. aiosmtpd's built-in PLAIN and LOGIN call a *synchronous* authenticator on the
  event loop; an argon2id check costs ~0.1 s of CPU and 64 MiB, which would stall every other
  session. So the handler offers `auth_PLAIN`/`auth_LOGIN` hooks (aiosmtpd prefers a handler's
  hooks to its own) that delegate to `SmtpAuthenticator`: coroutines that run argon2 in a worker
  thread, at most `max_parallel` at once, and can answer a failure after a delay without
  blocking the loop. No other mechanism is offered.
- TLS. PLAIN and LOGIN carry the password itself, so they are refused with `538 5.7.11` unless
  the connection is encrypted (STARTTLS done, or an implicit-TLS listener). aiosmtpd checks
  this first; the mechanisms check it again against the transport itself.
- Unknown users are verified against a dummy hash with the default parameters, and every kind of
  failure (unknown user, wrong password, wrong network) takes the same path: count, delay, one
  log line, `535 5.7.8`. Neither reply nor timing tells an attacker which usernames exist, and a
  correct password from outside the client's networks is not confirmed either.
- Limits: `relay.smtp.auth_limits.FailedAuthLimiter` counts failures per client address (an
  IPv6 client per /64) and says how long to wait before each 535 and when to answer 421 and
  close. Concurrent connections may each finish the attempt they started, so at most
  max_connections_per_client guesses can slip past the limit at once.
- Logs. One WARNING per failure, `AUTH failed for user=<name> from ip=<address> (<reason>)`, for
  fail2ban (docs/fail2ban.md). The name is cut to 64 characters from [A-Za-z0-9._@+-] (others
  become `?`), so it never contains a space and cannot forge the `from ip=` part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from aiosmtpd.smtp import AuthResult, Session
from argon2 import PasswordHasher

from relay.config.schema import ClientConfig
from relay.core.errors import PolicyError
from relay.core.policy import identify_client
from relay.smtp.auth_limits import AuthLimits, FailedAuthLimiter
from relay.smtp.passwords import (
    DEFAULT_HASHER,
    HASH_PARAMETERS,
    hash_password,
    hash_password_command,
    verify_password,
)
from relay.smtp.state import AuthenticatedUser, authenticated_user, client_ip_of

__all__ = [
    "HASH_PARAMETERS",
    "MECHANISMS",
    "AuthLimits",
    "AuthServer",
    "AuthenticatedUser",
    "FailedAuthLimiter",
    "SmtpAuthenticator",
    "authenticated_user",
    "hash_password",
    "hash_password_command",
    "log_safe_username",
    "verify_password",
    "without_empty_auth",
]

log = logging.getLogger("relay.auth")

_T = TypeVar("_T")

MECHANISMS = ("LOGIN", "PLAIN")

NOT_ENCRYPTED = "538 5.7.11 Encryption required for requested authentication mechanism"
INVALID = "535 5.7.8 Authentication credentials invalid"
TOO_MANY = "421 4.7.0 Too many failed authentications"
CANNOT_DECODE = "501 5.5.2 Can't decode base64"
CANNOT_SPLIT = "501 5.5.2 Can't split auth value"

_UNSAFE_LOG_CHARS = re.compile(r"[^A-Za-z0-9._@+-]")


class AuthServer(Protocol):
    """What the mechanisms use of aiosmtpd's `SMTP` (the `server` its AUTH hooks receive)."""

    @property
    def transport(self) -> asyncio.BaseTransport | None: ...

    @property
    def session(self) -> Session | None: ...

    async def push(self, status: str) -> None: ...

    async def challenge_auth(self, challenge: str) -> object:
        """Send `334 base64(challenge)`; the decoded answer as bytes, or a non-bytes marker
        when the client cancelled (`*`) or sent bad base64 (already answered with 501)."""


def without_empty_auth(responses: Sequence[str]) -> list[str]:
    """EHLO lines minus a bare `250-AUTH`: aiosmtpd prints one when every mechanism is
    excluded (an `auth: none` listener after STARTTLS), and RFC 4954 §3 needs at least one."""
    return [line for line in responses if line.strip().upper() not in ("250-AUTH", "250 AUTH")]


def log_safe_username(raw: bytes | str) -> str:
    """The username as a log field: at most 64 of [A-Za-z0-9._@+-], others as `?`, or `-`."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return _UNSAFE_LOG_CHARS.sub("?", text[:64]) or "-"


class SmtpAuthenticator:
    """PLAIN and LOGIN for aiosmtpd handlers, checked against `clients[].password_hash`.

    `clients` is read through a callable so a reload applies to the next AUTH. `sleep` is the
    delay before each 535 (tests pass a recorder); `hasher` makes the dummy hash for unknown
    users (tests pass cheap parameters).
    """

    def __init__(
        self,
        *,
        clients: Callable[[], Sequence[ClientConfig]],
        limiter: FailedAuthLimiter | None = None,
        hasher: PasswordHasher | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_parallel: int = 2,
    ) -> None:
        self.limiter = limiter if limiter is not None else FailedAuthLimiter()
        self._clients = clients
        self._hasher = hasher if hasher is not None else DEFAULT_HASHER
        self._sleep = sleep
        self._slots = asyncio.Semaphore(max_parallel)
        self._dummy_hash: str | None = None

    async def plain(self, server: AuthServer, args: list[str]) -> AuthResult:
        """RFC 4616: `[authzid] NUL authcid NUL passwd`, as initial response or after `334 `."""
        if not await self._may_try(server):
            return _handled()
        if len(args) > 1:
            response = _b64decode(args[1])
            if response is None:
                await server.push(CANNOT_DECODE)
                return _handled()
        else:
            answer = await server.challenge_auth("")
            if not isinstance(answer, bytes):  # "*" or bad base64: aiosmtpd answered 501
                return _handled()
            response = answer
        parts = response.split(b"\x00")
        if len(parts) != 3:
            await server.push(CANNOT_SPLIT)
            return _handled()
        authzid, authcid, password = parts
        return await self._check(server, authcid, password, authzid)

    async def login(self, server: AuthServer, args: list[str]) -> AuthResult:
        """The LOGIN mechanism: username (or initial response), then password, each base64."""
        if not await self._may_try(server):
            return _handled()
        username: bytes | None
        if len(args) > 1:
            username = _b64decode(args[1])
            if username is None:
                await server.push(CANNOT_DECODE)
                return _handled()
        else:
            answer = await server.challenge_auth("Username:")
            if not isinstance(answer, bytes):
                return _handled()
            username = answer
        password = await server.challenge_auth("Password:")
        if not isinstance(password, bytes):
            return _handled()
        return await self._check(server, username, password)

    # --- implementation ---------------------------------------------------------------------

    async def _may_try(self, server: AuthServer) -> bool:
        """Refuse before reading credentials: no TLS (538), or too many failures (421)."""
        transport = server.transport
        if transport is None or transport.get_extra_info("ssl_object") is None:
            await server.push(NOT_ENCRYPTED)
            return False
        ip = client_ip_of(server.session)
        if self.limiter.blocked(ip):
            failures = self.limiter.record_failure(ip)
            _log_failure("-", ip, "too many failed authentications", failures)
            await server.push(TOO_MANY)
            transport.close()
            return False
        return True

    async def _check(
        self, server: AuthServer, authcid: bytes, password: bytes, authzid: bytes = b""
    ) -> AuthResult:
        ip = client_ip_of(server.session)
        dummy = await self._dummy()
        client = self._client_named(authcid)
        stored = client.password_hash if client is not None else None
        # Always one verification, against the dummy for an unknown user: same work, same time.
        matched = await self._verify(stored.get_secret_value() if stored else dummy, password)
        reason: str | None
        if client is None or client.username is None:
            reason = "unknown user"
        elif not matched:
            reason = "wrong password"
        elif authzid and authzid != authcid:
            # RFC 4616 §2: acting as another identity is not something the relay grants.
            reason = "authorization identity differs from the username"
        else:
            reason = self._network_problem(client.username, ip)
            if reason is None:
                log.info(
                    "AUTH ok for user=%s (client %s) from ip=%s",
                    log_safe_username(authcid),
                    client.name,
                    ip,
                    extra={"event": "auth_ok", "client_ip": ip, "client": client.name},
                )
                return AuthResult(
                    success=True, auth_data=AuthenticatedUser(client.username, client.name)
                )
        failures = self.limiter.record_failure(ip)
        _log_failure(log_safe_username(authcid), ip, reason, failures)
        await self._sleep(self.limiter.delay(failures))
        return AuthResult(success=False, handled=False, message=INVALID)

    def _client_named(self, authcid: bytes) -> ClientConfig | None:
        try:
            username = authcid.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return next((c for c in self._clients() if c.username == username), None)

    def _network_problem(self, username: str, ip: str) -> str | None:
        try:
            identify_client(self._clients(), ip, username)
        except PolicyError:
            return "not from the client's networks"
        return None

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await self._in_thread(self._hasher.hash, secrets.token_hex(16))
        return self._dummy_hash

    async def _verify(self, stored: str, password: bytes) -> bool:
        return await self._in_thread(verify_password, stored, password, self._hasher)

    async def _in_thread(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run argon2 in the default executor, at most `max_parallel` at once.

        The slot is released when the thread finishes, not when the caller is cancelled (a
        client that hangs up mid-check), so abandoned checks cannot pile up beyond the bound.
        """
        await self._slots.acquire()
        try:
            future = asyncio.get_running_loop().run_in_executor(None, function, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(self._release)
        return await asyncio.shield(future)

    def _release(self, future: asyncio.Future[Any]) -> None:
        self._slots.release()
        if not future.cancelled():
            future.exception()  # retrieved, so an abandoned failure is not reported as lost


def _handled() -> AuthResult:
    """The mechanism has pushed its reply already; aiosmtpd adds nothing."""
    return AuthResult(success=False, handled=True)


def _log_failure(user: str, ip: str, reason: str, failures: int) -> None:
    log.warning(
        "AUTH failed for user=%s from ip=%s (%s)",
        user,
        ip,
        reason,
        extra={
            "event": "auth_failed",
            "client_ip": ip,
            "user": user,
            "reason": reason,
            "failures": failures,
        },
    )


def _b64decode(text: str) -> bytes | None:
    if text == "=":  # RFC 4954 §4: an empty initial response
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
