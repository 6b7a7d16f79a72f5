"""aiosmtpd's parsed PROXY header, reduced to the relay's `ProxyHeader`.

Why this module exists: `relay.smtp.proxy` decides who the client is and stays free of
aiosmtpd; this is the one place that reads aiosmtpd's `ProxyData` and its enums.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD

from relay.smtp.proxy import ProxyFamily, ProxyHeader

__all__ = ["proxy_header"]

_FAMILIES: dict[int, ProxyFamily] = {
    AF.INET: "inet",
    AF.INET6: "inet6",
    AF.UNIX: "unix",
    AF.UNSPEC: "unspec",
}


def proxy_header(data: Any) -> ProxyHeader:
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
