"""Access policy: who is the client, may it send as this sender, which route serves it.

PURE (DESIGN §2): values in, values out. It never touches sockets, files or clocks, so every
rule that keeps the relay from being an open relay (DESIGN §8) is testable as a table.

The SMTP layer calls these at the moment RFC 5321 lets it refuse:

- `identify_client` (by network, or by the AUTH username) and `check_envelope_sender` at
  MAIL FROM,
- `check_recipient` at RCPT TO,
- `check_authors` and `choose_route` at the end of DATA (the header From/Sender is only known
  then, and a null reverse-path `<>` is routed by the header From).

Refusals raise `PolicyError` carrying the exact RFC 5321 reply with its RFC 3463 enhanced code.
Address patterns are shell-style globs matched against the whole address, case-insensitively as
Exchange compares addresses: ASCII letters only (`fold_ascii`). Unicode case folding would make
`x@straße.de` match a pattern for `x@strasse.de`, and the long s or the Kelvin sign match s/k.

The author addresses `check_authors` gets come from `relay.core.message.authors.read_authors`,
which has already refused a present From/Sender/Resent-From that yields no address or an
ambiguous one, so an empty list here means the message has no author field at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from relay.core.errors import PolicyError, SmtpReply
from relay.core.message.addresses import fold_ascii
from relay.core.values import Route, pool_key

if TYPE_CHECKING:  # annotations only: pydantic loads socket (importlib.metadata, email)
    from relay.config.schema import ClientConfig, RouteConfig

__all__ = [
    "check_authors",
    "check_envelope_sender",
    "check_recipient",
    "choose_route",
    "effective_sender",
    "identify_client",
    "matches_any",
]


def _shown(text: str, limit: int = 200) -> str:
    """An address as it may appear in a reply: one line, printable, bounded (RFC 5321 §4.2)."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def matches_any(address: str, patterns: Sequence[str]) -> bool:
    """True when `address` matches one of the glob `patterns`, ASCII case-insensitively."""
    folded = fold_ascii(address)
    return any(fnmatchcase(folded, fold_ascii(pattern)) for pattern in patterns)


def identify_client(
    clients: Sequence[ClientConfig], client_ip: str, authenticated_user: str | None = None
) -> ClientConfig:
    """Which client this session is; no match is a relay refusal (DESIGN §8).

    An authenticated session is the client with that username, and must also come from one of
    its networks when it lists any. An unauthenticated session is the first client *without*
    credentials whose networks contain `client_ip`: a client with a username always logs in.
    """
    ip = _address(client_ip)
    if authenticated_user is not None:
        for client in clients:
            if client.username == authenticated_user:
                if client.networks and not _within(ip, client):
                    raise PolicyError(
                        SmtpReply(
                            550,
                            "5.7.1",
                            f"Relay access denied: user {_shown(authenticated_user)} may not send "
                            f"from {_shown(client_ip)}",
                        )
                    )
                return client
        raise PolicyError(
            SmtpReply(
                550,
                "5.7.1",
                f"Relay access denied: user {_shown(authenticated_user)} is not an allowed client",
            )
        )
    for client in clients:
        if not client.has_credentials and _within(ip, client):
            return client
    raise PolicyError(
        SmtpReply(
            550, "5.7.1", f"Relay access denied: {_shown(client_ip)} is not an allowed client"
        )
    )


def _address(client_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer address; an IPv4-mapped IPv6 address counts as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _within(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, client: ClientConfig) -> bool:
    return ip is not None and any(
        ip.version == net.version and ip in net for net in client.networks
    )


def check_envelope_sender(client: ClientConfig, mail_from: str) -> None:
    """MAIL FROM must be one of the client's allowed senders; `<>` is judged at DATA."""
    if mail_from and not matches_any(mail_from, client.senders):
        raise PolicyError(
            SmtpReply(
                550,
                "5.7.1",
                f"Sender <{_shown(mail_from)}> is not allowed for client {client.name}",
            )
        )


def check_recipient(client: ClientConfig, recipient: str) -> None:
    """RCPT TO must match the client's recipient patterns when it has any."""
    if client.recipients is not None and not matches_any(recipient, client.recipients):
        raise PolicyError(
            SmtpReply(
                550,
                "5.7.1",
                f"Recipient <{_shown(recipient)}> is not allowed for client {client.name}",
            )
        )


def check_authors(client: ClientConfig, authors: Sequence[str]) -> None:
    """Every From and Sender header address must be an allowed sender of the client.

    Checking only MAIL FROM would let an allowed device put any address in From: and have
    Microsoft 365 deliver it under the organisation's name.
    """
    for author in authors:
        if not matches_any(author, client.senders):
            raise PolicyError(
                SmtpReply(
                    550,
                    "5.7.1",
                    f"From/Sender address <{_shown(author)}> is not allowed "
                    f"for client {client.name}",
                )
            )


def effective_sender(mail_from: str, authors: Sequence[str]) -> str:
    """The address that selects the route: MAIL FROM, or the header From for `<>`."""
    if mail_from:
        return mail_from
    if authors:
        return authors[0]
    raise PolicyError(
        SmtpReply(
            550,
            "5.7.1",
            "A message with the null sender <> needs a From header naming an allowed sender",
        )
    )


def choose_route(routes: Sequence[RouteConfig], sender: str) -> Route:
    """The first route whose sender patterns match; its mailbox resolved for this sender (a
    pool stays a pool: which member sends is decided at each attempt, by budget)."""
    for route in routes:
        if matches_any(sender, route.senders):
            pool = route.pool
            if pool:
                mailbox = pool_key(pool)
            elif route.mailbox == "sender":
                mailbox = sender
            else:
                assert isinstance(route.mailbox, str)
                mailbox = route.mailbox
            return Route(
                name=route.label,
                auth_object=route.auth_object,
                mailbox=mailbox,
                rewrite_from=route.rewrite_from,
                save_to_sent_items=route.save_to_sent_items,
                pool=pool,
            )
    raise PolicyError(
        SmtpReply(550, "5.7.1", f"No outbound route is configured for sender <{_shown(sender)}>")
    )
