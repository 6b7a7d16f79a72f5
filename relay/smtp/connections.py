"""How many SMTP connections are open, in total and per client address, and closing them all.

Why this module exists: the limits are shared state across every listener and session, while
each `relay.smtp.session.RelaySMTP` is one connection; the service owns one `ConnectionLimiter`,
hands it to each session, and calls `close_all` at shutdown. A refused connection is answered
`421 4.7.0` by the session; shutdown answers `421 4.3.2` here (RFC 5321 §3.8).

"Per client address" is `relay.smtp.auth_limits.limit_key`: an IPv6 client counts per /64,
since one host can take a new address from its /64 for every connection.

Outsiders (an address that matches no client network, on a listener without AUTH) are no
client's business: the session answers them `554 5.7.1` at the greeting and closes. While that
happens they are counted against a small budget of their own (`OUTSIDER_CONNECTIONS`), never
against the clients' `max_connections`, so hosts that are not clients cannot take the slots
that clients need (issue #11 item 4).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from aiosmtpd.smtp import SMTP

from relay.core.replies import SHUTTING_DOWN, TOO_MANY_CONNECTIONS
from relay.ops.metrics import NULL_METRICS, MetricsSink
from relay.smtp.auth_limits import limit_key

__all__ = ["OUTSIDER_CONNECTIONS", "ConnectionLimiter"]

# Outsider connections being refused at once; past it they are closed without a reply.
OUTSIDER_CONNECTIONS = 16


class ConnectionLimiter:
    """Counts open SMTP connections, in total and per client address."""

    def __init__(
        self,
        *,
        total: int,
        per_client: int,
        outsiders: int = OUTSIDER_CONNECTIONS,
        metrics: MetricsSink = NULL_METRICS,
    ) -> None:
        self.total = total
        self.per_client = per_client
        self.outsiders = outsiders
        self._metrics = metrics
        self._open: Counter[str] = Counter()
        self._outsiders_open = 0
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

    def open_from(self, client_ip: str) -> int:
        """Connections open from this address (or its IPv6 /64)."""
        return self._open.get(limit_key(client_ip), 0)

    def try_acquire(self, client_ip: str) -> bool:
        key = limit_key(client_ip)
        if self.open_connections >= self.total or self._open[key] >= self.per_client:
            self._metrics.refused(TOO_MANY_CONNECTIONS.code)
            return False
        self._open[key] += 1
        self._metrics.connections(self.open_connections)
        return True

    def release(self, client_ip: str) -> None:
        key = limit_key(client_ip)
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]
        self._metrics.connections(self.open_connections)

    @property
    def outsiders_open(self) -> int:
        return self._outsiders_open

    def try_acquire_outsider(self) -> bool:
        """Count one outsider connection being refused; False past the outsiders' budget."""
        if self._outsiders_open >= self.outsiders:
            return False
        self._outsiders_open += 1
        return True

    def release_outsider(self) -> None:
        self._outsiders_open -= 1
