"""The SMTP session: aiosmtpd's protocol with the relay's limits and defences.

Why this module exists: `relay.smtp`'s handler decides what to answer to MAIL, RCPT and DATA;
this module decides what one connection may do at all, which concerns the session, not policy.
`RelaySMTP` subclasses aiosmtpd's `SMTP` protocol and calls the handler's hooks.

Protocol defences (DESIGN §8):

- DATA is read by `relay.smtp.data.DataPhase` (which `RelaySMTP` extends), not by aiosmtpd,
  so that `relay.core.message.limits` sees every line as it came off the wire (SMTP
  smuggling, size, header block size, MIME depth) and a deadline can bound the whole DATA
  phase (`421 4.4.2`); the idle timer is refreshed while DATA lines keep coming. What DATA
  holds in memory is reserved from the shared `relay.smtp.memory` budget as it arrives;
  without room the session stops reading (the deadline pauses meanwhile), and a message that
  cannot get room is read to its end without being kept and answered `452 4.3.1`;
- at most `max_commands` commands per connection (`421 4.7.0`, then closed);
- a SIZE= parameter over the limit is answered `552 5.3.4` (aiosmtpd's own reply has no
  enhanced code);
- with the PROXY protocol, only `proxy_networks` may connect, and the client address from their
  header replaces the balancer's in the session (policy, `Received:`, logs);
- connection limits (total and per client address, `relay.smtp.connections`) answer
  `421 4.7.0` and close;
- on a listener without AUTH, an address that is no client's is answered `554 5.7.1` at the
  greeting and closed, counted against the outsiders' own small budget (issue #11 item 4);
- after a 550 5.7.1 for relay access the session may send one more command (AUTH, STARTTLS
  and QUIT aside, and the EHLO that follows STARTTLS); the third refused command is answered
  `421 4.7.0` and the connection closed, so NOOP cannot keep a refused client's slot.

The client decision itself is the handler's (`SessionHooks.identify`); this module only asks
for it when the connection is admitted and keeps it on the session (`relay.smtp.state`).

Everything runs on the relay's single event loop: listeners are created with
`loop.create_server(lambda: RelaySMTP(...))` (see `service.py`), not aiosmtpd's threaded
`Controller`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiosmtpd.smtp import Session, syntax

from relay.core.errors import SmtpReply
from relay.core.message.limits import MESSAGE_TOO_BIG
from relay.core.replies import (
    TOO_MANY_COMMANDS,
    TOO_MANY_CONNECTIONS,
)
from relay.smtp.connections import ConnectionLimiter
from relay.smtp.data import DataPhase, SessionLimits, declared_size
from relay.smtp.memory import DataMemoryBudget
from relay.smtp.proxy import ProxyHeaderError, client_endpoint, is_trusted_proxy
from relay.smtp.proxy_header import proxy_header
from relay.smtp.state import Identity, RelaySession, SessionHooks, client_ip_of

__all__ = [
    "NOT_A_CLIENT",
    "TOO_MANY_REFUSED",
    "RelaySMTP",
    "SessionLimits",
    "server_tls_context",
]

# Logged as "relay.smtp", the name these events had before this module was split from it, so
# log lines and any filter on the logger name stay the same.
log = logging.getLogger("relay.smtp")

PROXY_HEADER_TIMEOUT = 10.0  # seconds a load balancer has to send its PROXY header

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

NOT_A_CLIENT = SmtpReply(554, "5.7.1", "Relay access denied: not an allowed client")
TOO_MANY_REFUSED = SmtpReply(421, "4.7.0", "Too many refused commands, closing connection")
# Commands a refused session may still use to become a client, or to leave.
_CURE_VERBS = frozenset({"AUTH", "STARTTLS", "QUIT"})
_REFUSED_COMMANDS_ALLOWED = 1  # after the 550; the next one closes (the third refused)
_DEFAULT_DATA_MEMORY = 512 * 1024 * 1024


def _transport_ip(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def _set_peer(session: Session, endpoint: tuple[str, int]) -> None:
    # aiosmtpd annotates `peer` as str but stores the transport's peername tuple there.
    session.peer = endpoint  # type: ignore[assignment]


class RelaySMTP(DataPhase):
    """aiosmtpd's SMTP protocol with the relay's session limits and defences (module docstring).

    Relies on these aiosmtpd 1.4 internals, each covered by tests/integration/test_attacks.py:
    `_smtp_methods` (command dispatch, wrapped to count commands), `_reader`, `_reset_timeout`,
    `_handler_coroutine` and `_original_transport`.

    `outsiders_may_connect` is True on AUTH listeners (auth: optional or required), where an
    address that is no client's may still log in; elsewhere such an address is refused at once.
    """

    def __init__(
        self,
        handler: SessionHooks,
        *,
        limiter: ConnectionLimiter,
        limits: SessionLimits | None = None,
        proxy_networks: Sequence[Network] | None = None,
        memory: DataMemoryBudget | None = None,
        outsiders_may_connect: bool = False,
        **kwargs: Any,
    ) -> None:
        if proxy_networks is not None:
            kwargs.setdefault("proxy_protocol_timeout", PROXY_HEADER_TIMEOUT)
        super().__init__(handler, **kwargs)
        if self._decode_data:
            raise ValueError("RelaySMTP reads DATA as bytes; decode_data must be False")
        self._hooks = handler
        self._limiter = limiter
        self._limits = limits or SessionLimits()
        self._memory = memory if memory is not None else DataMemoryBudget(_DEFAULT_DATA_MEMORY)
        self._outsiders_may_connect = outsiders_may_connect
        self._proxy_networks = tuple(proxy_networks) if proxy_networks is not None else None
        self._connected = False
        self._limited_ip: str | None = None
        self._outsider = False
        self._refused = False
        self._identity: Identity | None = None
        self._client_peer: tuple[str, int] | None = None
        self._proxy_data: Any = None
        self._commands_left = self._limits.max_commands
        self._refused_commands = 0
        self._after_starttls = False
        # How often DATA lines refresh the idle timer: often enough to never let it fire
        # while lines keep coming, rarely enough to cost nothing per line.
        self._refresh_every = min(1.0, self._timeout_duration / 4)
        self._refreshed = 0.0
        self._smtp_methods = {
            verb: self._counted(verb, method) for verb, method in self._smtp_methods.items()
        }

    # --- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if transport.get_extra_info("ssl_object") is not None:
            # Encrypted from the first byte (implicit TLS). aiosmtpd 1.4 only counts STARTTLS
            # (aio-libs/aiosmtpd#281): it would neither advertise nor accept AUTH here (538).
            # Internal `_auth_require_tls`; relay.smtp.auth's mechanisms check TLS themselves,
            # and tests/integration/test_smtp_auth.py covers AUTH over implicit TLS.
            self._auth_require_tls = False
        if self._connected:  # after STARTTLS: the same client, now on the TLS transport
            super().connection_made(transport)
            self._after_starttls = True
            if self._client_peer is not None and self.session is not None:
                _set_peer(self.session, self._client_peer)
                self.session.proxy_data = self._proxy_data
            self._keep_identity()
            return
        self._connected = True
        ip = _transport_ip(transport)
        if self._proxy_networks is not None:
            # Limits are counted per real client once its PROXY header is read (admit_proxied).
            if not is_trusted_proxy(ip, self._proxy_networks):
                self._refuse(transport, ip, None, "not one of smtp.proxy_networks")
                return
        elif not self._admit(ip):
            self._refuse_outsider(transport, ip)
            return
        elif not self._limiter.try_acquire(ip):
            self._refuse(transport, ip, TOO_MANY_CONNECTIONS, "connection limit reached")
            return
        else:
            self._limited_ip = ip
        self._limiter.track(self)
        super().connection_made(transport)
        self._keep_identity()

    def _admit(self, ip: str) -> bool:
        """Identify the client once, at connect; False for an outsider that must go now."""
        self._identity = self._hooks.identify(ip)
        return self._identity.client is not None or self._outsiders_may_connect

    def _keep_identity(self) -> None:
        if isinstance(self.session, RelaySession) and self._identity is not None:
            self.session.identity = self._identity

    def _refuse_outsider(self, transport: asyncio.BaseTransport, ip: str) -> None:
        """`554 5.7.1` at the greeting (RFC 5321 §3.1), within the outsiders' budget."""
        counted = self._limiter.try_acquire_outsider()
        self._outsider = counted
        self._refuse(transport, ip, NOT_A_CLIENT if counted else None, "not an allowed client")

    def _refuse(
        self, transport: asyncio.BaseTransport, ip: str, reply: SmtpReply | None, why: str
    ) -> None:
        self._refused = True
        log.warning(
            "refusing connection from %s: %s",
            ip,
            why,
            extra={"event": "connection_refused", "client_ip": ip, "reason": why},
        )
        if reply is not None and isinstance(transport, asyncio.WriteTransport):
            transport.write(f"{reply}\r\n".encode())
        transport.close()

    async def admit_proxied(self, proxy_data: Any) -> bool:
        """Accept the PROXY header from a trusted balancer: the session becomes the client's."""
        assert self.session is not None
        balancer = client_ip_of(self.session)
        peer = self.session.peer if isinstance(self.session.peer, tuple) else (balancer, 0)
        try:
            client = client_endpoint(proxy_header(proxy_data), (str(peer[0]), int(peer[1])))
        except ProxyHeaderError as refused:
            log.warning(
                "PROXY header from %s refused: %s",
                balancer,
                refused,
                extra={"event": "proxy_refused", "proxy_ip": balancer},
            )
            return False
        if not self._admit(client[0]):
            self._outsider = self._limiter.try_acquire_outsider()
            log.warning(
                "refusing %s (via %s): not an allowed client",
                client[0],
                balancer,
                extra={"event": "connection_refused", "client_ip": client[0]},
            )
            if self._outsider:
                await self.push(str(NOT_A_CLIENT))
            return False
        if not self._limiter.try_acquire(client[0]):
            log.warning(
                "connection limit reached, refusing %s (via %s)",
                client[0],
                balancer,
                extra={"event": "connection_refused", "client_ip": client[0]},
            )
            await self.push(str(TOO_MANY_CONNECTIONS))
            return False
        self._limited_ip = client[0]
        self._client_peer = client
        self._proxy_data = proxy_data
        _set_peer(self.session, client)
        self._keep_identity()
        log.info(
            "client %s connected through %s",
            client[0],
            balancer,
            extra={"event": "proxied", "client_ip": client[0], "proxy_ip": balancer},
        )
        return True

    def connection_lost(self, error: Exception | None) -> None:
        if self._outsider:
            self._outsider = False
            self._limiter.release_outsider()
        if self._refused:
            return
        if self._limited_ip is not None:
            self._limiter.release(self._limited_ip)
            self._limited_ip = None
        self._limiter.untrack(self)
        super().connection_lost(error)

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        result: bool | None = super().eof_received()
        return result

    # --- commands -----------------------------------------------------------------------------

    def _counted(self, verb: str, method: Callable[[str | None], Awaitable[None]]) -> Any:
        @functools.wraps(method)  # keeps the HELP texts aiosmtpd attaches to smtp_* methods
        async def counted(arg: str | None) -> None:
            if self._commands_left <= 0:
                self._close_refused(TOO_MANY_COMMANDS)
                return
            self._commands_left -= 1
            if self._one_refused_command_too_many(verb):
                self._close_refused(TOO_MANY_REFUSED)
                return
            await method(arg)

        return counted

    def _one_refused_command_too_many(self, verb: str) -> bool:
        """Count the commands of a session refused relay access (module docstring)."""
        after_starttls, self._after_starttls = self._after_starttls, False
        session = self.session
        if not isinstance(session, RelaySession) or not session.relay_refused:
            return False
        if session.authenticated or verb in _CURE_VERBS:
            return False
        if after_starttls and verb in ("EHLO", "HELO"):  # RFC 3207 §4.2: EHLO again after TLS
            return False
        self._refused_commands += 1
        return self._refused_commands > _REFUSED_COMMANDS_ALLOWED

    def _close_refused(self, reply: SmtpReply) -> None:
        if self.session is not None:
            self._hooks.record_refusal(self.session, reply)
        self._close_now(reply)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd command name
        declared = declared_size(arg)
        if declared is not None and self.data_size_limit and declared > self.data_size_limit:
            # aiosmtpd refuses this itself, before the MAIL hook and without an enhanced code.
            if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
                return
            await self.push(str(MESSAGE_TOO_BIG))
            return
        await super().smtp_MAIL(arg)


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2+ server context for STARTTLS and implicit TLS listeners."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context
