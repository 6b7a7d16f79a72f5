"""The admin HTTP server: health, readiness, Prometheus metrics and a status page (DESIGN §2, §9).

Why this module exists: operators and their tools ask the running relay three questions, each
answered by one endpoint, plus a page for people. This module is the HTTP shell; the verdicts
are decided in `relay.ops.health`, the page is drawn by `relay.ops.status_page`.

- `GET /healthz` (Docker HEALTHCHECK): 200 `ok`; 200 with one `degraded: <reason>` line per
  degradation when the relay works but an operator should look; 503 `unhealthy` with one
  reason per line when it cannot take mail.
- `GET /readyz` (load balancers): 200 `ok` when healthy, not degraded and tokens can be had;
  otherwise 503 `not ready` with the reasons.
- `GET /metrics`: `RelayMetrics.render()` in the Prometheus text format, with the queue gauges
  from one reading of `Store.stats` (kept incrementally by the store: a scrape lists nothing).
- `GET /`: the status page.

There is no authentication: the server binds to loopback by default and shows no secret. It
defends itself instead (`relay.ops.http_guard`): a request head must arrive within a header
timeout and a kept-alive connection is closed after an idle timeout (slowloris), and a request
whose Host header names another server is refused with 421 (DNS rebinding).

What the server needs from the relay comes in as `HealthSources`, a few callables the
composition root fills in; this module imports nothing that runs the relay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

from relay.config.schema import AdminConfig
from relay.ops.health import (
    CHECK_TIMEOUT,
    BoundListenerView,
    HealthChecks,
    HealthSources,
    SpoolProbe,
    listener_problems,
    spool_problems,
    token_problems,
)
from relay.ops.http_guard import HEADER_TIMEOUT, IDLE_TIMEOUT, GuardedConnections, HostPolicy
from relay.ops.metrics import RelayMetrics
from relay.ops.status_page import HistoryView, StatusView, render_status

__all__ = [
    "AdminServer",
    "BoundListenerView",
    "HealthSources",
    "SpoolProbe",
    "listener_problems",
    "spool_problems",
    "token_problems",
]

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
        header_timeout: float = HEADER_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._checks = HealthChecks(health, check_timeout=check_timeout)
        self._clock = clock
        self._monotonic = monotonic
        self._started = monotonic()
        self._header_timeout = header_timeout
        self._idle_timeout = idle_timeout
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the admin server is not running")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind `admin.address:admin.port` and serve on the running loop."""
        runner = web.AppRunner(
            web.Application(), access_log=None, keepalive_timeout=self._idle_timeout
        )  # access_log: scrapes every few seconds, no log lines

        def protocol() -> asyncio.Protocol:
            server = runner.server  # set by runner.setup() below, before anyone connects
            assert server is not None
            return server()

        guarded = GuardedConnections(
            protocol,
            header_timeout=self._header_timeout,
            idle_timeout=self._idle_timeout,
        )
        app = runner.app
        app.middlewares.append(
            guarded.host_check(HostPolicy(self._config.address, self._config.hostnames))
        )
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/", self._status_page)
        await runner.setup()
        try:
            self._server = await asyncio.get_running_loop().create_server(
                guarded, self._config.address, self._config.port, reuse_address=True
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        server, self._server = self._server, None
        runner, self._runner = self._runner, None
        if server is not None:
            server.close()
        if runner is not None:
            await runner.cleanup()  # closes the open connections
        if server is not None:
            await server.wait_closed()

    async def health_problems(self) -> list[str]:
        """The reasons /healthz would answer 503; empty when healthy."""
        return await self._checks.problems()

    async def healthy(self) -> bool:
        """True when /healthz would answer 200 (degraded or not)."""
        return not await self.health_problems()

    async def readiness_problems(self) -> list[str]:
        """The reasons /readyz would answer 503; empty when ready."""
        return await self._checks.readiness_problems()

    # --- handlers ---------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        problems = await self._checks.problems()
        degraded = [f"degraded: {reason}" for reason in self._checks.degraded()]
        if problems:
            return _refuse("unhealthy", problems + degraded)
        return _text("".join(f"{line}\n" for line in degraded) or "ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        problems = await self._checks.readiness_problems()
        return _refuse("not ready", problems) if problems else _text("ok\n")

    async def _metrics_page(self, request: web.Request) -> web.Response:
        now = self._clock()
        body = self._metrics.render(
            await self._checks.queue(now), now=now, mailboxes=await self._checks.mailboxes(now)
        )
        return web.Response(
            body=body, headers={**_HEADERS, "Content-Type": RelayMetrics.CONTENT_TYPE}
        )

    async def _status_page(self, request: web.Request) -> web.Response:
        now = self._clock()
        sources = self._checks.sources
        search = request.query.get("q", "")
        history, history_problem = await self._checks.history(search)
        page = render_status(
            StatusView(
                now=now,
                uptime=self._monotonic() - self._started,
                config=sources.config(),
                listeners=sources.listeners,
                bound=sources.bound(),
                tokens=sources.tokens(),
                queue=await self._checks.queue(now),
                mailboxes=await self._checks.mailboxes(now),
                errors=self._metrics.recent_errors(),
                problems=await self._checks.readiness_problems(),
                history=HistoryView(search, history, history_problem),
            )
        )
        return web.Response(text=page, content_type="text/html", headers=_PAGE_HEADERS)


def _text(body: str) -> web.Response:
    return web.Response(text=body, content_type=_TEXT, headers=_HEADERS)


def _refuse(failing: str, problems: list[str]) -> web.Response:
    body = failing + "\n" + "".join(f"- {problem}\n" for problem in problems)
    return web.Response(status=503, text=body, content_type=_TEXT, headers=_HEADERS)
