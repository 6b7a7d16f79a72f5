"""The SMTP session: aiosmtpd's protocol with the relay's limits and defences.

Why this module exists: `relay.smtp`'s handler decides what to answer to MAIL, RCPT and DATA;
this module decides what one connection may do at all, which concerns the session, not policy.
`RelaySMTP` subclasses aiosmtpd's `SMTP` protocol and calls the handler's hooks.

Protocol defences (DESIGN §8):

- DATA is read here, not by aiosmtpd, so that `relay.mime.limits` sees every line as it came off
  the wire (SMTP smuggling, size, header block size, MIME depth) and a deadline can bound the
  whole DATA phase (`421 4.4.2`); the idle timer is refreshed while DATA lines keep coming;
- at most `max_commands` commands per connection (`421 4.7.0`, then closed);
- a SIZE= parameter over the limit is answered `552 5.3.4` (aiosmtpd's own reply has no
  enhanced code);
- with the PROXY protocol, only `proxy_networks` may connect, and the client address from their
  header replaces the balancer's in the session (policy, `Received:`, logs);
- connection limits (total and per client address, `relay.connections`) answer `421 4.7.0`
  and close.

Everything runs on the relay's single event loop: listeners are created with
`loop.create_server(lambda: RelaySMTP(...))` (see `service.py`), not aiosmtpd's threaded
`Controller`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD
from aiosmtpd.smtp import SMTP, Session, syntax

from relay.config.schema import SmtpConfig
from relay.core.errors import SmtpReply
from relay.core.message.limits import (
    MESSAGE_TOO_BIG,
    ContentLimits,
    ContentRefusedError,
    DataDecoder,
)
from relay.core.replies import (
    DATA_SYNTAX,
    DATA_TIMEOUT,
    NEED_RCPT,
    TOO_MANY_COMMANDS,
    TOO_MANY_CONNECTIONS,
)
from relay.smtp.auth import RelaySession
from relay.smtp.connections import ConnectionLimiter
from relay.smtp.proxy import (
    ProxyFamily,
    ProxyHeader,
    ProxyHeaderError,
    client_endpoint,
    is_trusted_proxy,
)

if TYPE_CHECKING:  # relay.smtp imports this module for `RelaySMTP`
    from relay.smtp.handler import RelayHandler

__all__ = ["RelaySMTP", "SessionLimits", "client_ip_of", "server_tls_context"]

# Logged as "relay.smtp", the name these events had before this module was split from it, so
# log lines and any filter on the logger name stay the same.
log = logging.getLogger("relay.smtp")

PROXY_HEADER_TIMEOUT = 10.0  # seconds a load balancer has to send its PROXY header
_SIZE_PARAMETER = re.compile(r"(?i)(?:^|\s)SIZE=(\d{1,20})(?=\s|$)")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_ip_of(session: Session) -> str:
    """The client's IP address (behind a PROXY balancer, the real client's, not the balancer's)."""
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What one SMTP connection may do (DESIGN §8); built from `smtp:` by `from_config`."""

    content: ContentLimits = field(default_factory=ContentLimits)
    max_commands: int = 1000
    data_timeout: float = 600.0

    @classmethod
    def from_config(cls, smtp: SmtpConfig) -> SessionLimits:
        return cls(
            content=ContentLimits(
                max_header_bytes=smtp.max_header_size,
                max_mime_depth=smtp.max_mime_depth,
                bare_line_endings=smtp.bare_line_endings,
            ),
            max_commands=smtp.max_commands,
            data_timeout=smtp.data_timeout,
        )


def _transport_ip(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def _declared_size(arg: str | None) -> int | None:
    """The RFC 1870 SIZE= value of a MAIL FROM argument, if there is one."""
    match = _SIZE_PARAMETER.search(arg or "")
    return int(match.group(1)) if match else None


def _set_peer(session: Session, endpoint: tuple[str, int]) -> None:
    # aiosmtpd annotates `peer` as str but stores the transport's peername tuple there.
    session.peer = endpoint  # type: ignore[assignment]


_FAMILIES: dict[int, ProxyFamily] = {
    AF.INET: "inet",
    AF.INET6: "inet6",
    AF.UNIX: "unix",
    AF.UNSPEC: "unspec",
}


def _proxy_header(data: Any) -> ProxyHeader:
    """aiosmtpd's ProxyData -> our ProxyHeader (v1 `UNKNOWN` and v2 `LOCAL` are not relayed)."""
    relayed = data.command == V2_CMD.PROXY if data.version == 2 else data.family != AF.UNSPEC
    source = data.src_addr
    return ProxyHeader(
        version=int(data.version),
        relayed=bool(relayed),
        family=_FAMILIES.get(data.family, "unspec"),
        stream=data.protocol == PROTO.STREAM,
        source=str(source)
        if isinstance(source, ipaddress.IPv4Address | ipaddress.IPv6Address)
        else None,
        source_port=data.src_port if isinstance(data.src_port, int) else None,
    )


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP protocol with the relay's session limits and defences (module docstring).

    Relies on these aiosmtpd 1.4 internals, each covered by tests/integration/test_attacks.py:
    `_smtp_methods` (command dispatch, wrapped to count commands), `_reader`, `_reset_timeout`,
    `_handler_coroutine` and `_original_transport`.
    """

    def __init__(
        self,
        handler: RelayHandler,
        *,
        limiter: ConnectionLimiter,
        limits: SessionLimits | None = None,
        proxy_networks: Sequence[Network] | None = None,
        **kwargs: Any,
    ) -> None:
        if proxy_networks is not None:
            kwargs.setdefault("proxy_protocol_timeout", PROXY_HEADER_TIMEOUT)
        super().__init__(handler, **kwargs)
        if self._decode_data:
            raise ValueError("RelaySMTP reads DATA as bytes; decode_data must be False")
        self._relay_handler = handler
        self._limiter = limiter
        self._limits = limits or SessionLimits()
        self._proxy_networks = tuple(proxy_networks) if proxy_networks is not None else None
        self._connected = False
        self._limited_ip: str | None = None
        self._refused = False
        self._client_peer: tuple[str, int] | None = None
        self._proxy_data: Any = None
        self._commands_left = self._limits.max_commands
        # How often DATA lines refresh the idle timer: often enough to never let it fire
        # while lines keep coming, rarely enough to cost nothing per line.
        self._refresh_every = min(1.0, self._timeout_duration / 4)
        self._smtp_methods = {
            verb: self._counted(method) for verb, method in self._smtp_methods.items()
        }

    # --- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if transport.get_extra_info("ssl_object") is not None:
            # Encrypted from the first byte (implicit TLS). aiosmtpd 1.4 only counts STARTTLS
            # (aio-libs/aiosmtpd#281): it would neither advertise nor accept AUTH here (538).
            # Internal `_auth_require_tls`; relay.auth's mechanisms check TLS themselves, and
            # tests/integration/test_smtp_auth.py covers AUTH over implicit TLS.
            self._auth_require_tls = False
        if self._connected:  # after STARTTLS: the same client, now on the TLS transport
            super().connection_made(transport)
            if self._client_peer is not None and self.session is not None:
                _set_peer(self.session, self._client_peer)
                self.session.proxy_data = self._proxy_data
            return
        self._connected = True
        ip = _transport_ip(transport)
        if self._proxy_networks is not None:
            # Limits are counted per real client once its PROXY header is read (admit_proxied).
            if not is_trusted_proxy(ip, self._proxy_networks):
                self._refuse(transport, ip, None, "not one of smtp.proxy_networks")
                return
        elif not self._limiter.try_acquire(ip):
            self._refuse(transport, ip, TOO_MANY_CONNECTIONS, "connection limit reached")
            return
        else:
            self._limited_ip = ip
        self._limiter.track(self)
        super().connection_made(transport)

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
            client = client_endpoint(_proxy_header(proxy_data), (str(peer[0]), int(peer[1])))
        except ProxyHeaderError as refused:
            log.warning(
                "PROXY header from %s refused: %s",
                balancer,
                refused,
                extra={"event": "proxy_refused", "proxy_ip": balancer},
            )
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
        log.info(
            "client %s connected through %s",
            client[0],
            balancer,
            extra={"event": "proxied", "client_ip": client[0], "proxy_ip": balancer},
        )
        return True

    def connection_lost(self, error: Exception | None) -> None:
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

    def _close_now(self, reply: SmtpReply) -> None:
        """Send `reply`, close the connection and stop reading what else the client sent."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(f"{reply}\r\n".encode())
            transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    # --- commands -----------------------------------------------------------------------------

    def _counted(self, method: Callable[[str | None], Awaitable[None]]) -> Any:
        @functools.wraps(method)  # keeps the HELP texts aiosmtpd attaches to smtp_* methods
        async def counted(arg: str | None) -> None:
            if self._commands_left <= 0:
                if self.session is not None:
                    self._relay_handler.record_refusal(self.session, TOO_MANY_COMMANDS)
                self._close_now(TOO_MANY_COMMANDS)
                return
            self._commands_left -= 1
            await method(arg)

        return counted

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd command name
        declared = _declared_size(arg)
        if declared is not None and self.data_size_limit and declared > self.data_size_limit:
            # aiosmtpd refuses this itself, before the MAIL hook and without an enhanced code.
            if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
                return
            await self.push(str(MESSAGE_TOO_BIG))
            return
        await super().smtp_MAIL(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd command name
        """RFC 5321 §4.1.1.4 DATA, read through `relay.mime.limits.DataDecoder`."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.session is not None
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(str(NEED_RCPT))
            return
        if arg:
            await self.push(str(DATA_SYNTAX))
            return
        with self._relay_handler.receiving_data():  # a shutdown lets this message finish
            await self._receive_data()

    async def _receive_data(self) -> None:
        assert self.session is not None
        assert self.envelope is not None
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        decoder = DataDecoder(replace(self._limits.content, max_size=self.data_size_limit or None))
        deadline = self.loop.call_later(self._limits.data_timeout, self._data_deadline_passed)
        try:
            complete = await self._read_data(decoder)
        finally:
            deadline.cancel()
        if not complete:
            return
        try:
            # No local reference: the handler drops the raw bytes once it has prepared them.
            self.envelope.content = self.envelope.original_content = decoder.content()
        except ContentRefusedError as refused:
            self.envelope = self._create_envelope()
            self._relay_handler.record_refusal(self.session, refused.reply)
            await self.push(str(refused.reply))
            return
        status = await self._relay_handler.handle_DATA(self, self.session, self.envelope)
        self.envelope = self._create_envelope()
        await self.push(status)

    async def _read_data(self, decoder: DataDecoder) -> bool:
        """Feed the stream to `decoder` up to the end of DATA; False if the client went away."""
        reader: asyncio.StreamReader = self._reader
        refreshed = self.loop.time()
        while True:
            try:
                piece = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as overrun:
                # A line longer than the reader's buffer limit: take it in pieces (DESIGN §7
                # tolerates long lines; the size limit still bounds them).
                piece = await reader.read(overrun.consumed)
            except asyncio.IncompleteReadError:
                if self.transport is not None:
                    self.transport.close()
                return False
            if decoder.feed(piece):
                return True
            now = self.loop.time()
            if now - refreshed >= self._refresh_every:  # idle counts from the last DATA line
                self._reset_timeout()
                refreshed = now

    def _data_deadline_passed(self) -> None:
        if self.session is not None:
            self._relay_handler.record_refusal(self.session, DATA_TIMEOUT)
        self._close_now(DATA_TIMEOUT)


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2+ server context for STARTTLS and implicit TLS listeners."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context
