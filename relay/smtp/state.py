"""What the relay keeps on one SMTP session: who the client is, decided once.

Why this module exists: the client's identity is a decision about the session, not about each
command (DESIGN §2: "the client once per session"). It is made when the connection is admitted
(for the greeting's sake, see `relay.smtp.session`) and kept here; MAIL, RCPT and DATA read it.
It is made again only when its inputs change:

- AUTH succeeded, so the session is now a username rather than an address;
- a reload (SIGHUP) replaced the client list. The "generation" of the client list is the list
  object itself: a reload swaps in a new `Config`, whose `clients` is a new list, and the
  `Identity` keeps a reference to the list it was decided against, so `is` cannot be fooled by
  a reused object id.

Both the handler (which identifies) and the session protocol (which counts refused commands)
read this module, and `SessionHooks` says what the session needs of the handler: the handler
imports the session, never the other way round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.config.schema import ClientConfig
from relay.core.errors import SmtpReply

__all__ = [
    "AuthenticatedUser",
    "Identity",
    "RelaySession",
    "SessionHooks",
    "authenticated_user",
    "client_ip_of",
]


@dataclass(frozen=True, slots=True)
class AuthenticatedUser:
    """What a successful AUTH leaves in `session.auth_data`: never the password."""

    username: str
    client: str


@dataclass(frozen=True, slots=True)
class Identity:
    """The client decision for one session and what it was decided from.

    Exactly one of `client` (the session may submit as this client) and `refusal` (the
    `550 5.7.1` every MAIL and RCPT gets) is set.
    """

    clients: Sequence[ClientConfig]  # the list decided against; compared with `is`
    user: str | None
    client: ClientConfig | None = None
    refusal: SmtpReply | None = None

    def holds_for(self, clients: Sequence[ClientConfig], user: str | None) -> bool:
        return clients is self.clients and user == self.user


class RelaySession(Session):
    """aiosmtpd's Session plus the relay's per-session decisions.

    - `identity`: the client decision above, or None before it is made;
    - `relay_refused`: the session was answered 550 for relay access and has not become a
      client since; from then on `relay.smtp.session` counts its commands (issue #11 item 4);
    - `login_data` without a WARNING per login: aiosmtpd 1.4.6's own `smtp_AUTH` assigns the
      deprecated `Session.login_data` after every successful AUTH, and that property logs
      "login_data is deprecated" each time. The relay reads `auth_data`, so the value is kept
      quietly.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.identity: Identity | None = None
        self.relay_refused = False

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


def authenticated_user(session: Session) -> str | None:
    """The username this session authenticated as, or None."""
    data = session.auth_data
    if session.authenticated and isinstance(data, AuthenticatedUser):
        return data.username
    return None


def client_ip_of(session: Session | None) -> str:
    """The client's IP address (behind a PROXY balancer, the real client's, not the balancer's)."""
    peer = session.peer if session is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


class SessionHooks(Protocol):
    """What the session needs from the handler (`relay.smtp.handler.RelayHandler`)."""

    def identify(self, client_ip: str, user: str | None = None) -> Identity: ...

    def record_refusal(self, session: Session, reply: SmtpReply) -> None: ...

    def receiving_data(self) -> AbstractContextManager[None]: ...

    async def handle_DATA(  # noqa: N802 - aiosmtpd hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str: ...
