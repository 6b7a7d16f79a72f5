"""PROXY protocol v1/v2: which load balancers may speak it, and who the real client is.

Why this module exists: behind a TCP load balancer every connection comes from the balancer's
address, so the relay would identify every client as the balancer (DESIGN §9). HAProxy's PROXY
protocol (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt) puts the real client
address in a header before the first SMTP byte. That header is a claim anyone can make, so it is
believed only from `smtp.proxy_networks`; on a PROXY listener a connection from elsewhere, or one
without a valid header, is closed before the greeting.

Pure: the SMTP layer converts aiosmtpd's parsed header into a `ProxyHeader` and asks
`client_endpoint`; the answer is the address used for policy, `Received:` and logs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from relay.core.errors import RelayError

__all__ = ["ProxyFamily", "ProxyHeader", "ProxyHeaderError", "client_endpoint", "is_trusted_proxy"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Endpoint = tuple[str, int]
ProxyFamily = Literal["inet", "inet6", "unix", "unspec"]


class ProxyHeaderError(RelayError):
    """The PROXY header cannot be used; the connection is closed. The text is for the log."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header, reduced to what decides the client's address.

    `relayed` is False for a v2 LOCAL command (the balancer's own health check) and for v1
    `PROXY UNKNOWN`; the protocol says to use the real connection endpoints then.
    """

    version: int
    relayed: bool
    family: ProxyFamily
    stream: bool
    source: str | None
    source_port: int | None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_trusted_proxy(peer_ip: str, networks: Sequence[Network]) -> bool:
    """True when `peer_ip` (the TCP peer) is one of the load balancers allowed to send PROXY."""
    ip = _ip(peer_ip)
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


def client_endpoint(header: ProxyHeader, peer: Endpoint) -> Endpoint:
    """The client's (address, port) as the relay must treat it; raise `ProxyHeaderError`.

    A relayed TCP connection over IPv4 or IPv6 gives the header's source. A LOCAL or UNKNOWN
    header, or the UNSPEC family, means the balancer speaks for itself: the TCP peer is the client
    (and will rarely be an allowed one). UNIX sockets and datagrams are not SMTP clients.
    """
    if not header.relayed or header.family == "unspec":
        return peer
    if header.family == "unix" or not header.stream:
        raise ProxyHeaderError(
            f"PROXY v{header.version} for {header.family} datagram/socket refused"
        )
    try:
        ip = ipaddress.ip_address(header.source or "")
    except ValueError:
        ip = None
    if ip is None or header.source_port is None:
        raise ProxyHeaderError(f"PROXY v{header.version} header without a usable source address")
    if (ip.version == 4) != (header.family == "inet"):
        raise ProxyHeaderError(
            f"PROXY v{header.version} source {ip} does not match {header.family}"
        )
    return (str(_ip(str(ip))), header.source_port)
