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

Everything runs on the relay's single event loop: listeners are created with
`loop.create_server(lambda: RelaySMTP(...))` (see `service.py`), not aiosmtpd's threaded
`Controller`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.config import ClientConfig, Config
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
from relay.policy import (
    Route,
    check_authors,
    check_envelope_sender,
    check_recipient,
    choose_route,
    effective_sender,
    identify_client,
)

__all__ = [
    "INTERNAL_ERROR",
    "ConnectionLimiter",
    "RelayHandler",
    "RelaySMTP",
    "Submission",
    "Submitter",
]

log = logging.getLogger("relay.smtp")

INTERNAL_ERROR = SmtpReply(451, "4.3.0", "Internal error, please try again later")
TOO_MANY_CONNECTIONS = SmtpReply(421, "4.7.0", "Too many connections, try again later")
SHUTTING_DOWN = SmtpReply(421, "4.3.2", "Service shutting down, try again later")
NULL_SENDER = "<>"  # how aiosmtpd stores MAIL FROM:<>


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
    ) -> None:
        self._config = config
        self._submitter = submitter
        self._metrics = metrics
        self._clock = clock
        self._new_queue_id = new_queue_id
        self._accepting = True
        self._in_data = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def stop_accepting(self) -> None:
        """Shutdown: refuse new transactions with 421; those already in DATA carry on."""
        self._accepting = False

    async def wait_idle(self, grace: float) -> None:
        """Wait (at most `grace` seconds) until no transaction is in its DATA phase."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()

    # --- hooks ------------------------------------------------------------------------------

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
        self._in_data += 1
        self._idle.clear()
        try:
            return await self._guard(session, self._data(server, session, envelope))
        finally:
            self._in_data -= 1
            if self._in_data == 0:
                self._idle.set()

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
            self._metrics.refused(reply.code)
            log.info(
                "refused %s: %s",
                _client_ip(session),
                reply,
                extra={"event": "refused", "client_ip": _client_ip(session), "reply": str(reply)},
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error in SMTP hook", extra={"event": "smtp_error"})
            reply = INTERNAL_ERROR
        return str(reply)

    def _client(self, session: Session) -> ClientConfig:
        return identify_client(self._config().clients, _client_ip(session))

    async def _mail(
        self, session: Session, envelope: Envelope, address: str, options: Sequence[str]
    ) -> SmtpReply:
        if not self._accepting:
            return SHUTTING_DOWN
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
        self._transports: set[asyncio.BaseTransport] = set()

    def track(self, transport: asyncio.BaseTransport) -> None:
        self._transports.add(transport)

    def untrack(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None:
            self._transports.discard(transport)

    def close_all(self) -> None:
        """Close every open SMTP connection (shutdown, after the grace period)."""
        for transport in list(self._transports):
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


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP protocol with connection limits enforced before the greeting."""

    def __init__(self, handler: RelayHandler, *, limiter: ConnectionLimiter, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._limiter = limiter
        self._limited_ip: str | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._limited_ip is None and not self._refused:
            peer = transport.get_extra_info("peername")
            ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            if not self._limiter.try_acquire(ip):
                self._refused = True
                log.warning(
                    "connection limit reached, refusing %s",
                    ip,
                    extra={"event": "connection_refused", "client_ip": ip},
                )
                if isinstance(transport, asyncio.WriteTransport):
                    transport.write(f"{TOO_MANY_CONNECTIONS}\r\n".encode())
                transport.close()
                return
            self._limited_ip = ip
            self._limiter.track(transport)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._limited_ip is not None:
            self._limiter.release(self._limited_ip)
            self._limited_ip = None
        self._limiter.untrack(self._original_transport or self.transport)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        result: bool | None = super().eof_received()
        return result


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2+ server context for STARTTLS and implicit TLS listeners."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context
