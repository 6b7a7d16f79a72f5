"""The SMTP listener: aiosmtpd hooks that turn policy decisions into RFC 5321 replies.

Why this module exists: it is the thin I/O shell between the network and the pure core. It
asks `policy` whether the client may do what it asks, asks `message` to prepare the message
for Graph, and hands the prepared message to a `Submitter` (the delivery engine), whose reply
it returns to the client verbatim. It knows nothing about Graph or tokens.

Reply discipline (DESIGN §5, §8):
- every reply produced here carries an RFC 3463 enhanced status code;
- an unexpected exception in a hook is logged with its traceback and answered
  `451 4.3.0` with a generic text, never aiosmtpd's default `500 Error: (Exception) details`;
- connection limits (total and per client address) answer `421 4.7.0` and close.

SMTP AUTH (PLAIN, LOGIN; DESIGN §8) is `relay.auth`'s: the handler's `auth_*` hooks replace
aiosmtpd's built-in mechanisms and delegate to it, and an authenticated session is identified
by its username (`policy.identify_client`).

Protocol defences (DESIGN §8), in `RelaySMTP` because they concern the session, not policy:

- DATA is read here, not by aiosmtpd, so that `relay.mime.limits` sees every line as it came off
  the wire (SMTP smuggling, size, header block size, MIME depth) and a deadline can bound the
  whole DATA phase (`421 4.4.2`); the idle timer is refreshed while DATA lines keep coming;
- at most `max_commands` commands per connection (`421 4.7.0`, then closed);
- a SIZE= parameter over the limit is answered `552 5.3.4` (aiosmtpd's own reply has no
  enhanced code);
- envelope addresses with control characters or invalid UTF-8 are refused before any policy or
  header sees them;
- with the PROXY protocol, only `proxy_networks` may connect, and the client address from their
  header replaces the balancer's in the session (policy, `Received:`, logs).

Everything runs on the relay's single event loop: listeners are created with
`loop.create_server(lambda: RelaySMTP(...))` (see `service.py`), not aiosmtpd's threaded
`Controller`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import re
import ssl
import unicodedata
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, syntax

from relay.auth import RelaySession, SmtpAuthenticator, authenticated_user, without_empty_auth
from relay.config import ClientConfig, Config, SmtpConfig
from relay.errors import PolicyError, SmtpReply
from relay.message import (
    Envelope as MessageEnvelope,
)
from relay.message import (
    PreparedMessage,
    TraceInfo,
    UnparseableMessageError,
    author_addresses,
    prepare_for_graph,
)
from relay.metrics import NULL_METRICS, MetricsSink
from relay.mime.limits import MESSAGE_TOO_BIG, ContentLimits, ContentRefusedError, DataDecoder
from relay.policy import (
    Route,
    check_authors,
    check_envelope_sender,
    check_recipient,
    choose_route,
    effective_sender,
    identify_client,
)
from relay.proxy import (
    ProxyFamily,
    ProxyHeader,
    ProxyHeaderError,
    client_endpoint,
    is_trusted_proxy,
)

__all__ = [
    "INTERNAL_ERROR",
    "ConnectionLimiter",
    "RelayHandler",
    "RelaySMTP",
    "SessionLimits",
    "Submission",
    "Submitter",
]

log = logging.getLogger("relay.smtp")

INTERNAL_ERROR = SmtpReply(451, "4.3.0", "Internal error, please try again later")
TOO_MANY_CONNECTIONS = SmtpReply(421, "4.7.0", "Too many connections, try again later")
SHUTTING_DOWN = SmtpReply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_COMMANDS = SmtpReply(421, "4.7.0", "Too many commands, closing connection")
DATA_TIMEOUT = SmtpReply(421, "4.4.2", "DATA took too long, closing connection")
NEED_RCPT = SmtpReply(503, "5.5.1", "Error: need RCPT command")
DATA_SYNTAX = SmtpReply(501, "5.5.4", "Syntax: DATA")
BAD_SENDER = SmtpReply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = SmtpReply(501, "5.1.3", "Bad recipient address syntax")
# RFC 6531: non-ASCII addresses need the SMTPUTF8 parameter of MAIL FROM; X.6.7 is the code it
# registers for refusing them ("Non-ASCII addresses not permitted").
NON_ASCII_SENDER = SmtpReply(553, "5.6.7", "Non-ASCII sender address needs MAIL FROM ... SMTPUTF8")
NON_ASCII_RECIPIENT = SmtpReply(
    553, "5.6.7", "Non-ASCII recipient address needs MAIL FROM ... SMTPUTF8"
)
NULL_SENDER = "<>"  # how aiosmtpd stores MAIL FROM:<>
PROXY_HEADER_TIMEOUT = 10.0  # seconds a load balancer has to send its PROXY header
# Control characters (CR, LF, NUL, C1), Unicode line separators and the lone surrogates that
# aiosmtpd's surrogateescape decoding makes of invalid UTF-8: none belongs in an address, and a
# line break in one could end up splitting a header field or a log line.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_SIZE_PARAMETER = re.compile(r"(?i)(?:^|\s)SIZE=(\d{1,20})(?=\s|$)")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Submission:
    """A message that passed policy, ready for the delivery engine."""

    queue_id: str
    client: str
    client_ip: str
    mail_from: str
    recipients: tuple[str, ...]
    route: Route
    message: PreparedMessage


class Submitter(Protocol):
    """The delivery engine as the SMTP layer sees it: message in, final reply out."""

    async def submit(self, submission: Submission) -> SmtpReply: ...


def _client_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


def _mail_from(envelope: Envelope) -> str:
    sender = envelope.mail_from or ""
    return "" if sender == NULL_SENDER else str(sender)


def _address_refusal(
    address: str, *, smtputf8: bool, bad: SmtpReply, non_ascii: SmtpReply
) -> SmtpReply | None:
    """Why an envelope address cannot be used at all, before any policy looks at it."""
    if any(unicodedata.category(ch) in _UNSAFE_CATEGORIES for ch in address):
        return bad
    if not smtputf8 and not address.isascii():
        return non_ascii
    return None


class RelayHandler:
    """aiosmtpd handler: MAIL, RCPT and DATA hooks for one listener.

    `config` is read through a callable so a reload (SIGHUP) takes effect for the next command
    without rebuilding listeners.
    """

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        submitter: Submitter,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        new_queue_id: Callable[[], str] = lambda: uuid.uuid4().hex[:16].upper(),
        metrics: MetricsSink = NULL_METRICS,
        authenticator: SmtpAuthenticator | None = None,
    ) -> None:
        self._config = config
        self._submitter = submitter
        self._auth = (
            authenticator
            if authenticator is not None
            else SmtpAuthenticator(clients=lambda: config().clients)
        )
        self._metrics = metrics
        self._clock = clock
        self._new_queue_id = new_queue_id
        self._accepting = True
        self._in_data = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        """Shutdown: refuse new transactions with 421; those already in DATA carry on."""
        self._accepting = False

    async def wait_idle(self, grace: float) -> None:
        """Wait (at most `grace` seconds) until no transaction is in its DATA phase."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()

    # --- hooks ------------------------------------------------------------------------------

    async def handle_EHLO(  # noqa: N802 - aiosmtpd hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to a 5-argument EHLO hook
        return without_empty_auth(responses)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802 - aiosmtpd AUTH hook
        return await self._auth.plain(server, args)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802 - aiosmtpd AUTH hook
        return await self._auth.login(server, args)

    async def handle_MAIL(  # noqa: N802 - aiosmtpd hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        return await self._guard(session, self._mail(session, envelope, address, mail_options))

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        return await self._guard(session, self._rcpt(session, envelope, address, rcpt_options))

    async def handle_DATA(  # noqa: N802 - aiosmtpd hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        with self.receiving_data():
            return await self._guard(session, self._data(server, session, envelope))

    @contextlib.contextmanager
    def receiving_data(self) -> Iterator[None]:
        """Marks a transaction between its 354 and its final reply; shutdown waits for these."""
        self._in_data += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_data -= 1
            if self._in_data == 0:
                self._idle.set()

    async def handle_PROXY(  # noqa: N802 - aiosmtpd hook name
        self, server: SMTP, session: Session, envelope: Envelope, proxy_data: Any
    ) -> bool:
        """A PROXY header arrived on a PROXY listener; the session decides whether it stands."""
        return isinstance(server, RelaySMTP) and await server.admit_proxied(proxy_data)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd calls this for exceptions outside our hooks; never leak details."""
        log.error("smtp session error", exc_info=error, extra={"event": "smtp_error"})
        return str(INTERNAL_ERROR)

    # --- implementation ---------------------------------------------------------------------

    async def _guard(self, session: Session, step: Awaitable[SmtpReply]) -> str:
        try:
            reply = await step
        except PolicyError as refusal:
            reply = refusal.reply
            self.record_refusal(session, reply)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error in SMTP hook", extra={"event": "smtp_error"})
            reply = INTERNAL_ERROR
        return str(reply)

    def record_refusal(self, session: Session, reply: SmtpReply) -> None:
        """Count and log one refusal (also used by `RelaySMTP` for refusals at end of DATA)."""
        self._metrics.refused(reply.code)
        log.info(
            "refused %s: %s",
            _client_ip(session),
            reply,
            extra={"event": "refused", "client_ip": _client_ip(session), "reply": str(reply)},
        )

    def _client(self, session: Session) -> ClientConfig:
        return identify_client(
            self._config().clients, _client_ip(session), authenticated_user(session)
        )

    async def _mail(
        self, session: Session, envelope: Envelope, address: str, options: Sequence[str]
    ) -> SmtpReply:
        if not self._accepting:
            return SHUTTING_DOWN
        refusal = _address_refusal(
            address, smtputf8=envelope.smtp_utf8, bad=BAD_SENDER, non_ascii=NON_ASCII_SENDER
        )
        if refusal is not None:
            raise PolicyError(refusal)
        client = self._client(session)
        sender = "" if address == NULL_SENDER else address
        check_envelope_sender(client, sender)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return SmtpReply(250, "2.1.0", "Sender OK")

    async def _rcpt(
        self, session: Session, envelope: Envelope, address: str, options: Sequence[str]
    ) -> SmtpReply:
        config = self._config()
        refusal = _address_refusal(
            address, smtputf8=envelope.smtp_utf8, bad=BAD_RECIPIENT, non_ascii=NON_ASCII_RECIPIENT
        )
        if refusal is not None:
            raise PolicyError(refusal)
        client = self._client(session)
        if options:
            return SmtpReply(555, "5.5.4", "RCPT TO parameters are not supported")
        if len(envelope.rcpt_tos) >= config.smtp.max_recipients:
            self._metrics.refused(452)
            return SmtpReply(
                452, "4.5.3", f"Too many recipients (at most {config.smtp.max_recipients})"
            )
        check_recipient(client, address)
        envelope.rcpt_tos.append(address)
        return SmtpReply(250, "2.1.5", "Recipient OK")

    async def _data(self, server: SMTP, session: Session, envelope: Envelope) -> SmtpReply:
        config = self._config()
        client = self._client(session)
        raw: bytes = envelope.original_content or b""
        mail_from = _mail_from(envelope)
        queue_id = self._new_queue_id()
        recipients = tuple(str(r) for r in envelope.rcpt_tos)
        try:
            authors = author_addresses(raw)
            check_authors(client, authors)
            route = choose_route(config.routes, effective_sender(mail_from, authors))
            prepared = prepare_for_graph(
                raw,
                MessageEnvelope(mail_from=mail_from, recipients=recipients),
                TraceInfo(
                    relay_hostname=config.smtp.hostname,
                    client_ip=_client_ip(session),
                    client_hostname=None,
                    helo=session.host_name,
                    protocol=_protocol(server, session),
                    queue_id=queue_id,
                    now=self._clock(),
                ),
                message_id_local=queue_id,
            )
        except UnparseableMessageError as exc:
            log.warning(
                "unparseable message from %s: %s",
                _client_ip(session),
                exc,
                extra={"event": "rejected", "queue_id": queue_id},
            )
            return SmtpReply(554, "5.6.0", "Message headers cannot be parsed")
        return await self._submitter.submit(
            Submission(
                queue_id=queue_id,
                client=client.name,
                client_ip=_client_ip(session),
                mail_from=mail_from,
                recipients=recipients,
                route=route,
                message=prepared,
            )
        )


def _protocol(server: SMTP, session: Session) -> str:
    """RFC 3848 protocol name for the Received header."""
    transport = server.transport
    tls = transport is not None and transport.get_extra_info("ssl_object") is not None
    base = "ESMTP" if session.extended_smtp else "SMTP"
    if tls:
        base += "S"
    if session.authenticated:
        base += "A"
    return base


class ConnectionLimiter:
    """Counts open SMTP connections, in total and per client address."""

    def __init__(self, *, total: int, per_client: int, metrics: MetricsSink = NULL_METRICS) -> None:
        self.total = total
        self.per_client = per_client
        self._metrics = metrics
        self._open: Counter[str] = Counter()
        self._sessions: set[SMTP] = set()

    def track(self, session: SMTP) -> None:
        self._sessions.add(session)

    def untrack(self, session: SMTP) -> None:
        self._sessions.discard(session)

    def close_all(self) -> None:
        """Say 421 (RFC 5321 §3.8) and close every open SMTP connection (shutdown, after the
        grace period in which transactions in DATA could finish)."""
        for session in list(self._sessions):
            # the session's current transport: after STARTTLS that is the TLS one
            transport = session.transport
            if transport is None:
                continue
            if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
                with contextlib.suppress(Exception):  # a connection dying now is fine
                    transport.write(f"{SHUTTING_DOWN}\r\n".encode())
            transport.close()

    @property
    def open_connections(self) -> int:
        return sum(self._open.values())

    def try_acquire(self, client_ip: str) -> bool:
        if self.open_connections >= self.total or self._open[client_ip] >= self.per_client:
            self._metrics.refused(TOO_MANY_CONNECTIONS.code)
            return False
        self._open[client_ip] += 1
        self._metrics.connections(self.open_connections)
        return True

    def release(self, client_ip: str) -> None:
        self._open[client_ip] -= 1
        if self._open[client_ip] <= 0:
            del self._open[client_ip]
        self._metrics.connections(self.open_connections)


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
        balancer = _client_ip(self.session)
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
            content = decoder.content()
        except ContentRefusedError as refused:
            self.envelope = self._create_envelope()
            self._relay_handler.record_refusal(self.session, refused.reply)
            await self.push(str(refused.reply))
            return
        self.envelope.content = self.envelope.original_content = content
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
