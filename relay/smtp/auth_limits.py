"""Failed-AUTH limits: slow down, then lock out, an address that keeps guessing passwords.

Why this module exists: the limiter is shared state across every listener and session (the
service owns one), with its own clock and memory bound, while `relay.smtp.auth` is the
mechanisms one session runs. `limit_key` is also how `relay.smtp.connections` counts
connections per client, so one rule says what "one client address" is.

Failures are counted per client address in a sliding window. An IPv6 client counts per /64:
one host is routinely given a whole /64 and can take a new address from it for every attempt.
An IPv4-mapped IPv6 address counts as its IPv4 address. Failure n is answered after
`first_delay * 2**(n-1)` seconds (at most `max_delay`); once `max_failures` fell within
`window`, every further AUTH from that address gets `421 4.7.0` and the connection is closed,
which also counts, so a persistent guesser stays locked out. Memory is bounded: at most
`max_tracked` addresses are kept, least recently failed first out.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AuthLimits", "FailedAuthLimiter", "limit_key"]


@dataclass(frozen=True, slots=True)
class AuthLimits:
    """How failed AUTH attempts from one client address are slowed down and then refused."""

    max_failures: int = 5
    window: float = 600.0  # seconds
    first_delay: float = 1.0  # seconds before the first 535; doubles with each failure
    max_delay: float = 16.0
    max_tracked: int = 10_000  # client addresses remembered at once


class FailedAuthLimiter:
    """Failed AUTH attempts per client address in a sliding window; bounded memory.

    The clock is injected (seconds, monotonic) so tests control the window without sleeping.
    """

    def __init__(
        self, limits: AuthLimits | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits if limits is not None else AuthLimits()
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def failures(self, client_ip: str) -> int:
        """Failures from this address (or its IPv6 /64) within the window."""
        times = self._recent(limit_key(client_ip), self._clock())
        return len(times) if times is not None else 0

    def blocked(self, client_ip: str) -> bool:
        return self.failures(client_ip) >= self.limits.max_failures

    def record_failure(self, client_ip: str) -> int:
        """Count one failure now; return the failures within the window, this one included."""
        now = self._clock()
        key = limit_key(client_ip)
        times = self._recent(key, now)
        if times is None:
            times = deque(maxlen=self.limits.max_failures)
            self._failures[key] = times
        times.append(now)
        self._failures.move_to_end(key)
        while len(self._failures) > self.limits.max_tracked:
            self._failures.popitem(last=False)
        return len(times)

    def delay(self, failures: int) -> float:
        """Seconds to wait before answering failure number `failures`."""
        if failures < 1:
            return 0.0
        return min(self.limits.first_delay * 2.0 ** (failures - 1), self.limits.max_delay)

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and now - times[0] >= self.limits.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times


def limit_key(client_ip: str) -> str:
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
