"""How many SMTP connections are open, in total and per client address, and closing them all.

Why this module exists: the limits are shared state across every listener and session, while
each `relay.smtp_protocol.RelaySMTP` is one connection; the service owns one `ConnectionLimiter`,
hands it to each session, and calls `close_all` at shutdown. A refused connection is answered
`421 4.7.0` by the session; shutdown answers `421 4.3.2` here (RFC 5321 §3.8).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from aiosmtpd.smtp import SMTP

from relay.core.replies import SHUTTING_DOWN, TOO_MANY_CONNECTIONS
from relay.ops.metrics import NULL_METRICS, MetricsSink

__all__ = ["ConnectionLimiter"]


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
