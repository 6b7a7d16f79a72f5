"""The SMTP listener: aiosmtpd hooks that turn policy decisions into RFC 5321 replies.

Why this module exists: it is the thin I/O shell between the network and the pure core. It
asks `policy` whether the client may do what it asks, asks `message` to prepare the message
for Graph, and hands the prepared message to a `Submitter` (the delivery engine), whose reply
it returns to the client verbatim. It knows nothing about Graph or tokens.

Reply discipline (DESIGN §5, §8):
- every reply produced here carries an RFC 3463 enhanced status code;
- an unexpected exception in a hook is logged with its traceback and answered
  `451 4.3.0` with a generic text, never aiosmtpd's default `500 Error: (Exception) details`;
- once shutdown has begun, a new transaction is answered `421 4.3.2`.

SMTP AUTH (PLAIN, LOGIN; DESIGN §8) is `relay.smtp.auth`'s: the handler's `auth_*` hooks
replace aiosmtpd's built-in mechanisms and delegate to it, and an authenticated session is
identified by its username (`policy.identify_client`).

The client is identified once per session (`identify`, kept as `relay.smtp.state.Identity`
on the session) and again only after a successful AUTH or a reload that replaced the client
list; MAIL, RCPT and DATA read the kept decision.

Envelope addresses with control characters or invalid UTF-8 are refused here, before any policy
or header sees them (DESIGN §8). The other protocol defences concern the session, not policy,
and live in `relay.smtp.session` (`RelaySMTP`, which calls these hooks); connection counting
is `relay.smtp.connections`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import unicodedata
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from relay.config.schema import ClientConfig, Config
from relay.core.errors import PolicyError, SmtpReply
from relay.core.message.prepare import (
    Envelope as MessageEnvelope,
)
from relay.core.message.prepare import (
    TraceInfo,
    UnparseableMessageError,
    prepare_for_graph,
    read_authors,
    split_header_from_body,
)
from relay.core.policy import (
    check_authors,
    check_envelope_sender,
    check_recipient,
    choose_route,
    effective_sender,
    identify_client,
)
from relay.core.replies import (
    BAD_RECIPIENT,
    BAD_SENDER,
    INTERNAL_ERROR,
    NON_ASCII_RECIPIENT,
    NON_ASCII_SENDER,
    SHUTTING_DOWN,
)
from relay.core.values import Submission, SubmitOutcome
from relay.ops.metrics import NULL_METRICS, MetricsSink
from relay.smtp.auth import SmtpAuthenticator, without_empty_auth
from relay.smtp.session import RelaySMTP
from relay.smtp.state import Identity, RelaySession, authenticated_user, client_ip_of
from relay.store.queue_ids import new_queue_id

__all__ = [
    "INTERNAL_ERROR",
    "RelayHandler",
    "Submitter",
]

log = logging.getLogger("relay.smtp")

NULL_SENDER = "<>"  # how aiosmtpd stores MAIL FROM:<>
# Control characters (CR, LF, NUL, C1), Unicode line separators and the lone surrogates that
# aiosmtpd's surrogateescape decoding makes of invalid UTF-8: none belongs in an address, and a
# line break in one could end up splitting a header field or a log line.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


class Submitter(Protocol):
    """The delivery engine as the SMTP layer sees it: message in, typed outcome out."""

    async def submit(self, submission: Submission) -> SubmitOutcome: ...


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
        new_queue_id: Callable[[], str] = new_queue_id,
        metrics: MetricsSink = NULL_METRICS,
        authenticator: SmtpAuthenticator | None = None,
        identify: Callable[..., ClientConfig] = identify_client,
    ) -> None:
        self._config = config
        self._identify = identify  # policy.identify_client; tests count its calls
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
            client_ip_of(session),
            reply,
            extra={"event": "refused", "client_ip": client_ip_of(session), "reply": str(reply)},
        )

    def identify(self, client_ip: str, user: str | None = None) -> Identity:
        """Decide which client `client_ip` (authenticated as `user`) is, against the current
        client list; a refusal is part of the decision, not an exception."""
        clients = self._config().clients
        try:
            return Identity(clients, user, client=self._identify(clients, client_ip, user))
        except PolicyError as refused:
            return Identity(clients, user, refusal=refused.reply)

    def _client(self, session: Session) -> ClientConfig:
        """The session's client, as decided once (see the module docstring)."""
        user = authenticated_user(session)
        kept = session.identity if isinstance(session, RelaySession) else None
        identity = kept
        if identity is None or not identity.holds_for(self._config().clients, user):
            identity = self.identify(client_ip_of(session), user)
            if isinstance(session, RelaySession):
                session.identity = identity
        if identity.refusal is not None:
            if isinstance(session, RelaySession):
                session.relay_refused = True
            raise PolicyError(identity.refusal)
        assert identity.client is not None
        if isinstance(session, RelaySession):
            session.relay_refused = False
        return identity.client

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
            message = split_header_from_body(raw)  # the one split of this DATA
            authors = read_authors(message.fields)  # UnreadableAuthorError is a 550 5.7.1
            if authors.reply_to:
                log.info(
                    "reply-to %s (not checked)",
                    ", ".join(authors.reply_to),
                    extra={"event": "reply_to", "queue_id": queue_id},
                )
            check_authors(client, authors.addresses)
            sender = effective_sender(mail_from, authors.addresses)
            route = choose_route(config.routes, sender)
            prepared = prepare_for_graph(
                message,
                MessageEnvelope(mail_from=mail_from, recipients=recipients),
                TraceInfo(
                    relay_hostname=config.smtp.hostname,
                    client_ip=client_ip_of(session),
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
                client_ip_of(session),
                exc,
                extra={"event": "rejected", "queue_id": queue_id},
            )
            return SmtpReply(554, "5.6.0", "Message headers cannot be parsed")
        # From here on only the prepared copy is needed: let a large original go now.
        del raw, message
        envelope.content = envelope.original_content = None
        outcome = await self._submitter.submit(
            Submission(
                queue_id=queue_id,
                client=client.name,
                client_ip=client_ip_of(session),
                mail_from=mail_from,
                recipients=recipients,
                route=route,
                message=prepared,
                sender=sender,
            )
        )
        return outcome.reply  # Accepted: 250 delivered/queued; Refused: its 4xx/5xx


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
