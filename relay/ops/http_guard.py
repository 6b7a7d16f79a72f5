"""What the admin server refuses before any handler runs: slow clients and foreign Host names.

Why this module exists: aiohttp waits for a request head as long as the client likes (its
keep-alive timer only starts after a first response), so one client that opens a connection and
sends nothing, or sends one header byte per second (slowloris), holds a connection and a task
for good. And a loopback server is reachable from any web page the operator opens: a DNS name
the attacker controls can be re-pointed at 127.0.0.1 (DNS rebinding), and the browser then
sends the attacker's page's requests, with `Host: evil.example`, to the admin server.

Theory of operation
-------------------
`GuardedConnections` is the protocol factory the admin server listens with. Each connection
gets a `_Guard`, which passes every event to aiohttp's own protocol unchanged and keeps one
timer, in the manner of nginx's `client_header_timeout` and `keepalive_timeout`:

    open                      the request head must be complete within `header_timeout`
    handler running           no timer (the handlers bound their own work)
    response done, kept open  the next request must start within `idle_timeout` ...
    first byte of it          ... and its head be complete within `header_timeout`

When the timer fires the connection is aborted: there is nothing to say to such a client, and
an abort does not wait for a client that does not read either. The handler's start and end are
told by `host_check`, the middleware that also checks the Host header (so any request aiohttp
parses passes through it, a 404 included).

The Host check (RFC 9112 §3.2, RFC 9110 §15.5.20): a request without exactly one Host header is
malformed, 400. A Host naming another server than this one is answered 421 Misdirected
Request, which says what is true: the request reached a server that will not answer for that
name (400 would claim the request is malformed, which it is not). Accepted are the bind
address, `localhost`, `127.0.0.1`, `[::1]` and `admin.hostnames`. A server bound to a wildcard
address (0.0.0.0, ::) also accepts every IP literal: rebinding needs a DNS name, and probes and
scrapers in containers (Kubernetes httpGet, Prometheus) address a pod by its IP.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

__all__ = [
    "HEADER_TIMEOUT",
    "IDLE_TIMEOUT",
    "GuardedConnections",
    "HostPolicy",
]

# A request head is a few hundred bytes; a client on loopback or a LAN sends it at once.
HEADER_TIMEOUT: Final = 10.0
# Prometheus scrapes every 15-60 s and keeps its connection; longer idle is a held slot.
IDLE_TIMEOUT: Final = 75.0

_LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::"})


class HostPolicy:
    """Which Host header values name this server (see the module docstring)."""

    def __init__(self, bind_address: str, hostnames: Iterable[str] = ()) -> None:
        self._names = frozenset(
            {_normal(n) for n in (*_LOOPBACK_NAMES, bind_address, *hostnames)} - {""}
        )
        self._any_ip = bind_address.strip("[]") in _WILDCARDS

    def allows(self, host: str) -> bool:
        """Whether a Host header value (name or IP literal, optional port) names this server."""
        name = _host_name(host)
        if name is None:
            return False
        if name in self._names:
            return True
        return self._any_ip and _is_ip(name)


class GuardedConnections:
    """Protocol factory around aiohttp's: the timers of the module docstring, per connection."""

    def __init__(
        self,
        inner: Callable[[], asyncio.Protocol],
        *,
        header_timeout: float = HEADER_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._inner = inner
        self._header_timeout = header_timeout
        self._idle_timeout = idle_timeout
        self._guards: dict[asyncio.BaseTransport, _Guard] = {}

    def __call__(self) -> asyncio.Protocol:
        return _Guard(self, self._inner())

    def host_check(self, policy: HostPolicy) -> Middleware:
        """The aiohttp middleware: refuse foreign Host names; stop the timer while handling."""

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            guard = self._guards.get(request.transport) if request.transport else None
            if guard is not None:
                guard.handling()
            try:
                hosts = request.headers.getall("Host", [])
                if len(hosts) != 1 or _host_name(hosts[0]) is None:
                    return _refusal(400, "a request needs exactly one valid Host header")
                if not policy.allows(hosts[0]):
                    return _refusal(421, "this server does not answer for that host name")
                return await handler(request)
            finally:
                if guard is not None:
                    guard.handled()

        return middleware

    def _opened(self, transport: asyncio.BaseTransport, guard: _Guard) -> None:
        self._guards[transport] = guard

    def _closed(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None:
            self._guards.pop(transport, None)


class _Guard(asyncio.Protocol):
    """One connection: aiohttp's protocol plus one timer."""

    def __init__(self, owner: GuardedConnections, inner: asyncio.Protocol) -> None:
        self._owner = owner
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_for_request = False  # kept alive, no byte of the next request yet

    # --- asyncio.Protocol, forwarded ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._owner._opened(transport, self)
        self._arm(self._owner._header_timeout)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_request:
            self._waiting_for_request = False
            self._arm(self._owner._header_timeout)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._owner._closed(self._transport)
        self._transport = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # --- the timer ----------------------------------------------------------------------------

    def handling(self) -> None:
        """A request head is complete and its handler runs."""
        self._waiting_for_request = False
        self._disarm()

    def handled(self) -> None:
        """The handler returned; the connection may be kept for the next request."""
        self._waiting_for_request = True
        self._arm(self._owner._idle_timeout)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.abort()


def _refusal(status: int, reason: str) -> web.Response:
    response = web.Response(
        status=status,
        text=reason + "\n",
        content_type="text/plain",
        headers={"Cache-Control": "no-store"},
    )
    response.force_close()  # nothing more to say to this client on this connection
    return response


def _host_name(host: str) -> str | None:
    """The name or IP of a Host header value, normalised; None when it is not one."""
    host = host.strip()
    if host.startswith("["):  # IPv6 literal, RFC 3986 §3.2.2
        end = host.find("]")
        if end < 0 or (host[end + 1 :] and not _is_port(host[end + 1 :])):
            return None
        name = host[1:end]
        return name.lower() if _is_ip(name) and ":" in name else None
    name, colon, port = host.partition(":")
    if colon and not _is_port(colon + port):
        return None
    name = _normal(name)
    if not name or any(c.isspace() or c in "/\\@?#[]" for c in name):
        return None
    return name


def _normal(name: str) -> str:
    return name.strip().strip("[]").rstrip(".").lower()


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit() and len(text) <= 6


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
