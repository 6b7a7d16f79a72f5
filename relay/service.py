"""Composition root: builds the running relay from a validated Config on one event loop.

Why this module exists: wiring is the only place that knows every concrete class. Everything
else receives its collaborators, which keeps the pure core pure and lets tests assemble the same
relay against the sandbox.

Order of start: token provider and Graph client (no network yet), delivery engine, SMTP
listeners bound with `loop.create_server` (one loop for SMTP, delivery and HTTP). Stop reverses
it: stop accepting, let deliveries in progress finish (bounded), then close the HTTP session.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.attempts import single_request_limit
from relay.config import Config, ListenerConfig
from relay.delivery import DeliveryEngine
from relay.graph import GraphClient
from relay.smtp import ConnectionLimiter, RelayHandler, RelaySMTP, server_tls_context
from relay.spool import Spool
from relay.tokens import TokenProvider

__all__ = ["BoundListener", "RelayService"]

log = logging.getLogger("relay.service")

# RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes for the next command.
SMTP_IDLE_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class BoundListener:
    config: ListenerConfig
    host: str
    port: int


@dataclass(slots=True)
class _Running:
    servers: list[asyncio.Server] = field(default_factory=list)
    listeners: list[BoundListener] = field(default_factory=list)


class RelayService:
    """The relay: SMTP listeners + delivery engine + Graph client, started and stopped as one."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.tokens = TokenProvider(config.auth_objects)
        self.graph = GraphClient(self.tokens)
        self.spool = (
            Spool(config.delivery.spool_dir, reserve_bytes=int(1.5 * self.max_message_size))
            if config.delivery.mode != "direct"
            else None
        )
        self.delivery = DeliveryEngine(
            config=self.current_config, graph=self.graph, spool=self.spool
        )
        self.limiter = ConnectionLimiter(
            total=config.smtp.max_connections, per_client=config.smtp.max_connections_per_client
        )
        self.handler = RelayHandler(config=self.current_config, submitter=self.delivery)
        self._running = _Running()

    def current_config(self) -> Config:
        return self._config

    @property
    def listeners(self) -> list[BoundListener]:
        return list(self._running.listeners)

    @property
    def max_message_size(self) -> int:
        """What EHLO advertises as SIZE: the configured limit, capped by one Graph request."""
        return min(self._config.smtp.max_message_size, single_request_limit())

    async def start(self) -> None:
        """Recover the spool, start the workers, then bind the listeners."""
        loop = asyncio.get_running_loop()
        tls = self._tls_context()
        handler = self.handler
        try:
            await self.delivery.start()
            for listener in self._config.smtp.listeners:
                server = await loop.create_server(
                    self._protocol_factory(handler, listener, tls),
                    host=listener.address,
                    port=listener.port,
                    ssl=tls if listener.tls == "implicit" else None,
                    reuse_address=True,
                )
                self._running.servers.append(server)
                sock = server.sockets[0].getsockname()
                bound = BoundListener(listener, str(sock[0]), int(sock[1]))
                self._running.listeners.append(bound)
                log.info(
                    "listening on %s:%d (tls=%s)",
                    bound.host,
                    bound.port,
                    listener.tls,
                    extra={"event": "listening", "address": bound.host, "port": bound.port},
                )
        except BaseException:
            await self.stop()
            raise

    async def stop(self, grace: float = 30.0) -> None:
        """Graceful stop (SIGTERM): nothing acknowledged is lost, nothing half-received is kept.

        1. Stop accepting connections; new MAIL commands in open sessions get 421.
        2. Let transactions already in DATA finish (they are spooled or answered), bounded.
        3. Close the remaining sessions, stop the workers (requeueing what they hold).
        """
        for server in self._running.servers:
            server.close()
        self.handler.stop_accepting()
        await self.handler.wait_idle(grace / 2)
        self.limiter.close_all()
        for server in self._running.servers:
            await server.wait_closed()
        self._running = _Running()
        await self.delivery.stop(grace / 2)
        if self.spool is not None:
            self.spool.close()  # releases the lock: another relay may now recover this spool
        await self.graph.close()
        self.tokens.close()

    def _tls_context(self) -> ssl.SSLContext | None:
        files = self._config.smtp.tls
        if files is None:
            return None
        return server_tls_context(str(files.cert_file), str(files.key_file))

    def _protocol_factory(
        self, handler: RelayHandler, listener: ListenerConfig, tls: ssl.SSLContext | None
    ) -> Callable[[], RelaySMTP]:
        loop = asyncio.get_running_loop()
        config = self._config

        def factory() -> RelaySMTP:
            return RelaySMTP(
                handler,
                limiter=self.limiter,
                data_size_limit=self.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=config.smtp.hostname,
                ident="smtp-graph-relay",
                tls_context=tls if listener.tls == "starttls" else None,
                require_starttls=False,
                timeout=SMTP_IDLE_TIMEOUT,
                auth_require_tls=True,
                loop=loop,
            )

        return factory
