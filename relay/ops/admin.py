"""The admin HTTP server: health, readiness, Prometheus metrics and a status page (DESIGN §2, §9).

Why this module exists: operators and their tools ask the running relay three questions, each
answered by one endpoint, plus a page for people:

- `GET /healthz` (Docker HEALTHCHECK, systemd watchdog): is this process able to take mail?
  Every configured SMTP listener is bound, and the spool can be written (the root is a writable
  directory with more than the reserve free). 200 `ok`, or 503 with one reason per line.
- `GET /readyz` (load balancers): /healthz, and Microsoft 365 tokens can be had as far as the
  relay knows: some auth object's last token request succeeded, or none has failed yet (a relay
  that never needed a token is ready). 200 `ok` or 503 with reasons.
- `GET /metrics`: `RelayMetrics.render()` in the Prometheus text format.
- `GET /`: a self-contained HTML page: version, uptime, listeners, routes, queue, token status per
  auth object and the last delivery errors with their Graph code, request-id and remedy.

The checks never touch the network. The spool is probed in a worker thread under a deadline, so
a hung file system makes /healthz answer 503 quickly instead of not at all. There is no
authentication: the server binds to loopback by default and shows no secret (no credential,
proxy URL or message content; addresses only as far as the route configuration names them).

What the server needs from the relay comes in as `HealthSources`, a few callables the
composition root fills in; this module imports nothing that runs the relay.
"""

from __future__ import annotations

import asyncio
import html
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from aiohttp import web

from relay import __version__
from relay.config.schema import AdminConfig, Config, ListenerConfig
from relay.graph.tokens import TokenStatus
from relay.ops.metrics import ErrorReport, RelayMetrics
from relay.store.files.spool import SpoolError, SpoolStats

__all__ = [
    "AdminServer",
    "BoundListenerView",
    "HealthSources",
    "SpoolProbe",
    "listener_problems",
    "spool_problems",
    "token_problems",
]

# A health check that cannot finish in this time is itself the answer: 503.
CHECK_TIMEOUT = 2.0
_TEXT = "text/plain"
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
_PAGE_HEADERS = {
    **_HEADERS,
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Frame-Options": "DENY",
}


class BoundListenerView(Protocol):
    """A listening SMTP socket (relay.service.BoundListener)."""

    @property
    def config(self) -> ListenerConfig: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


class SpoolProbe(Protocol):
    """What the checks read from the spool (relay.spool.Spool). Blocking calls."""

    @property
    def root(self) -> Path: ...
    def has_room_for(self, size: int) -> bool: ...
    def stats(self, now: float) -> SpoolStats: ...


@dataclass(frozen=True, slots=True)
class HealthSources:
    """The running relay as the admin server sees it; filled in by the composition root.

    `listeners` are the listeners that must be bound (fixed at start: a reload cannot move
    them); `bound` the ones listening now. `tokens` and `config` are called per request, so a
    reload that replaces the token provider is followed. `spool` is None in direct mode.
    """

    config: Callable[[], Config]
    listeners: Sequence[ListenerConfig]
    bound: Callable[[], Sequence[BoundListenerView]]
    tokens: Callable[[], Mapping[str, TokenStatus]]
    spool: SpoolProbe | None = None


# --- the checks ---------------------------------------------------------------------------


def listener_problems(
    expected: Sequence[ListenerConfig], bound: Sequence[BoundListenerView]
) -> list[str]:
    """One reason per configured listener that is not listening."""
    listening = [b.config for b in bound]
    problems = []
    for listener in expected:
        if listener in listening:
            listening.remove(listener)
        else:
            problems.append(f"SMTP listener {listener.address}:{listener.port} is not bound")
    if not expected:
        problems.append("no SMTP listener is configured")
    return problems


def spool_problems(spool: SpoolProbe) -> list[str]:
    """Whether the spool could take a message now. Blocking (a few syscalls)."""
    root = spool.root
    if not root.is_dir():
        return [f"spool {root} is not a directory"]
    if not os.access(root, os.W_OK | os.X_OK):
        return [f"spool {root} is not writable"]
    if not spool.has_room_for(0):
        return [f"spool {root}: free space is below the reserve for one message"]
    return []


def token_problems(statuses: Mapping[str, TokenStatus]) -> list[str]:
    """Empty when some auth object's last token request succeeded or none failed yet."""
    if any(status.last_ok for status in statuses.values()):
        return []
    return [
        f"auth object {name}: the last token request failed"
        + (f" ({status.code})" if status.code else "")
        + (f": {status.remedy}" if status.remedy else "")
        for name, status in sorted(statuses.items())
        if status.last_ok is False
    ]


# --- the server ---------------------------------------------------------------------------


class AdminServer:
    """aiohttp server for the endpoints in the module docstring, on the relay's event loop."""

    def __init__(
        self,
        config: AdminConfig,
        *,
        metrics: RelayMetrics,
        health: HealthSources,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        check_timeout: float = CHECK_TIMEOUT,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._health = health
        self._clock = clock
        self._monotonic = monotonic
        self._started = monotonic()
        self._check_timeout = check_timeout
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the admin server is not running")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        """Bind `admin.address:admin.port` and serve on the running loop."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/", self._status_page)
        runner = web.AppRunner(app, access_log=None)  # scrapes every few seconds: no log lines
        await runner.setup()
        try:
            await web.TCPSite(runner, self._config.address, self._config.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def health_problems(self) -> list[str]:
        """The reasons /healthz would answer 503; empty when healthy."""
        health = self._health
        problems = listener_problems(health.listeners, health.bound())
        if health.spool is not None:
            problems += await self._probe(health.spool)
        return problems

    async def healthy(self) -> bool:
        """For a watchdog: True when /healthz would answer 200."""
        return not await self.health_problems()

    async def readiness_problems(self) -> list[str]:
        """The reasons /readyz would answer 503; empty when ready."""
        return await self.health_problems() + token_problems(self._health.tokens())

    async def _probe(self, spool: SpoolProbe) -> list[str]:
        try:
            async with asyncio.timeout(self._check_timeout):
                return await asyncio.to_thread(spool_problems, spool)
        except TimeoutError:
            return [f"spool {spool.root}: no answer within {self._check_timeout:g}s"]
        except OSError as exc:
            return [f"spool {spool.root}: {exc.strerror or exc}"]

    # --- handlers ---------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return _verdict(await self.health_problems(), "unhealthy")

    async def _readyz(self, request: web.Request) -> web.Response:
        return _verdict(await self.readiness_problems(), "not ready")

    async def _metrics_page(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self._metrics.render)  # reads the spool
        return web.Response(
            body=body, headers={**_HEADERS, "Content-Type": RelayMetrics.CONTENT_TYPE}
        )

    async def _status_page(self, request: web.Request) -> web.Response:
        now = self._clock()
        spool = self._health.spool
        queue: SpoolStats | str | None = None
        if spool is not None:
            try:
                async with asyncio.timeout(self._check_timeout):
                    queue = await asyncio.to_thread(spool.stats, now)
            except TimeoutError:
                queue = "the spool did not answer in time"
            except (SpoolError, OSError) as exc:
                queue = f"cannot read the spool: {exc}"
        page = render_status(
            StatusView(
                now=now,
                uptime=self._monotonic() - self._started,
                config=self._health.config(),
                listeners=self._health.listeners,
                bound=self._health.bound(),
                tokens=self._health.tokens(),
                queue=queue,
                errors=self._metrics.recent_errors(),
                problems=await self.readiness_problems(),
            )
        )
        return web.Response(text=page, content_type="text/html", headers=_PAGE_HEADERS)


def _verdict(problems: list[str], failing: str) -> web.Response:
    if not problems:
        return web.Response(text="ok\n", content_type=_TEXT, headers=_HEADERS)
    body = failing + "\n" + "".join(f"- {problem}\n" for problem in problems)
    return web.Response(status=503, text=body, content_type=_TEXT, headers=_HEADERS)


# --- the status page ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatusView:
    """Everything the status page shows, gathered before rendering."""

    now: float
    uptime: float
    config: Config
    listeners: Sequence[ListenerConfig]
    bound: Sequence[BoundListenerView]
    tokens: Mapping[str, TokenStatus]
    queue: SpoolStats | str | None  # None: direct mode; str: why it cannot be read
    errors: Sequence[ErrorReport]
    problems: Sequence[str]


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin-bottom:1.5em}"
    "th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}"
    "th{background:#f0f0f0}.bad{color:#a00}.ok{color:#070}"
)


def render_status(view: StatusView) -> str:
    """The status page as one HTML document; every value from outside is escaped."""
    state = (
        '<p class="ok">Ready.</p>'
        if not view.problems
        else '<ul class="bad">' + "".join(f"<li>{_e(p)}</li>" for p in view.problems) + "</ul>"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>smtp-graph-relay</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>smtp-graph-relay {_e(__version__)}</h1>",
        f"<p>Up {_e(_duration(view.uptime))}; page generated {_e(_time(view.now))}.</p>",
        state,
        "<h2>Listeners</h2>",
        _listeners_table(view),
        "<h2>Routes</h2>",
        _table(
            ["Route", "Senders", "Auth object", "Mailbox"],
            [
                [
                    f"routes[{i}]",
                    ", ".join(route.senders),
                    route.auth_object,
                    "the sender's own mailbox" if route.mailbox == "sender" else route.mailbox,
                ]
                for i, route in enumerate(view.config.routes)
            ],
        ),
        "<h2>Queue</h2>",
        _queue_section(view),
        "<h2>Tokens</h2>",
        _tokens_table(view),
        f"<h2>Last delivery errors ({len(view.errors)})</h2>",
        _errors_table(view.errors),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _listeners_table(view: StatusView) -> str:
    bound = list(view.bound)
    rows = []
    for listener in view.listeners:
        match = next((b for b in bound if b.config == listener), None)
        if match is not None:
            bound.remove(match)
        rows.append(
            [
                f"{listener.address}:{listener.port}",
                listener.tls,
                listener.auth,
                f"listening on {match.host}:{match.port}" if match else "NOT BOUND",
            ]
        )
    return _table(["Address", "TLS", "AUTH", "State"], rows)


def _queue_section(view: StatusView) -> str:
    queue = view.queue
    if queue is None:
        return "<p>Direct mode: no spool, nothing is queued.</p>"
    if isinstance(queue, str):
        return f'<p class="bad">{_e(queue)}</p>'
    oldest = (
        "-"
        if queue.oldest_created is None
        else _duration(max(0.0, view.now - queue.oldest_created))
    )
    return _table(
        ["Queued", "In delivery", "Oldest waiting", "Dead", "Quarantined", "Corrupt"],
        [
            [
                str(queue.queued),
                str(queue.active),
                oldest,
                str(queue.dead),
                str(queue.quarantined),
                str(queue.corrupt),
            ]
        ],
    )


def _tokens_table(view: StatusView) -> str:
    rows = []
    for name, auth in view.config.auth_objects.items():
        status = view.tokens.get(name, TokenStatus())
        if status.last_ok is None:
            state, fix = "no token needed yet", ""
        elif status.last_ok:
            valid = f", valid until {_time(status.expires_at)}" if status.expires_at else ""
            state, fix = f"ok at {_time(status.last_at)}{valid}", ""
        else:
            code = f" ({status.code})" if status.code else ""
            state, fix = f"FAILED at {_time(status.last_at)}{code}", status.remedy
        rows.append([name, auth.tenant_id, auth.client_id, state, fix])
    return _table(["Auth object", "Tenant", "Client id", "Last token request", "Remedy"], rows)


_ERROR_COLUMNS = ("Time", "Event", "Queue id", "Route", "Mailbox", "HTTP", "Code", "Request id",
                  "Reply", "Remedy", "Detail")  # fmt: skip


def _errors_table(errors: Sequence[ErrorReport]) -> str:
    if not errors:
        return "<p>None since the relay started.</p>"
    return _table(
        _ERROR_COLUMNS,
        [
            [
                _time(e.at),
                e.event,
                e.queue_id,
                e.route,
                e.mailbox,
                "" if e.http_status is None else str(e.http_status),
                e.code or "",
                e.request_id or "",
                e.reply,
                e.remedy,
                e.message,
            ]
            for e in errors
        ],
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _time(when: float | None) -> str:
    if when is None:
        return "-"
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"
