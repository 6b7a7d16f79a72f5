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
import signal
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from relay.config.load import load_config
from relay.config.schema import Config, ListenerConfig
from relay.core.errors import ConfigError
from relay.core.start_problems import CannotStartError, Listening
from relay.delivery.attempt import size_limit
from relay.delivery.engine import DeliveryEngine
from relay.delivery.workers import RESCAN_SECONDS
from relay.graph.client import GraphClient
from relay.graph.tokens import TokenProvider
from relay.ops.admin import AdminServer, HealthSources
from relay.ops.logs import reopen_log_files, setup_logging
from relay.ops.metrics import NULL_METRICS, MetricsSink, RelayMetrics
from relay.ops.startup import binding, spool_opening
from relay.ops.systemd import SystemdNotifier, run_watchdog
from relay.smtp.auth import MECHANISMS, SmtpAuthenticator
from relay.smtp.connections import ConnectionLimiter
from relay.smtp.handler import RelayHandler
from relay.smtp.memory import DataMemoryBudget
from relay.smtp.session import RelaySMTP, SessionLimits, server_tls_context
from relay.store.files.store import FileStore

__all__ = ["BoundListener", "RelayService", "serve_until_stopped"]

log = logging.getLogger("relay.service")

# RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes for the next command.
SMTP_IDLE_TIMEOUT = 300.0
# A replaced token provider is closed this long after a reload (its requests time out at 15 s).
RETIRE_AFTER = 60.0


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

    def __init__(
        self,
        config: Config,
        *,
        metrics: RelayMetrics | None = None,
        auth_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rescan_seconds: float = RESCAN_SECONDS,
    ) -> None:
        self._config = config
        self.metrics = metrics
        self._sink: MetricsSink = metrics if metrics is not None else NULL_METRICS
        # Listeners are bound once; a reload cannot move them (see reload()).
        self._listener_configs = tuple(config.smtp.listeners)
        self.tokens = TokenProvider(config.auth_objects, metrics=self._sink)
        self.graph = GraphClient(self.tokens)
        self.store = (
            FileStore(config.delivery.spool_dir, reserve_bytes=int(1.5 * self.max_message_size))
            if config.delivery.mode != "direct"
            else None
        )
        self.spool = self.store.spool if self.store is not None else None
        self.delivery = DeliveryEngine(
            config=self.current_config,
            graph=self.graph,
            store=self.store,
            metrics=self._sink,
            rescan_seconds=rescan_seconds,
            history=None if self.store else FileStore.history_only(config.delivery.spool_dir),
        )
        self.limiter = ConnectionLimiter(
            total=config.smtp.max_connections,
            per_client=config.smtp.max_connections_per_client,
            metrics=self._sink,
        )
        # One DATA memory budget for every listener and session (smtp.max_data_memory).
        self.data_memory = DataMemoryBudget(int(config.smtp.max_data_memory))
        # One authenticator for all listeners: failed-AUTH counts are per client address.
        # `auth_sleep` is the delay before each 535 (tests pass a recorder).
        self.authenticator = SmtpAuthenticator(
            clients=lambda: self._config.clients, sleep=auth_sleep
        )
        self.handler = RelayHandler(
            config=self.current_config,
            submitter=self.delivery,
            metrics=self._sink,
            authenticator=self.authenticator,
        )
        self._server_tls: ssl.SSLContext | None = None
        self._retired: list[asyncio.TimerHandle] = []
        self._retired_providers: list[TokenProvider] = []
        self._running = _Running()

    def current_config(self) -> Config:
        return self._config

    def alive(self) -> bool:
        """For the systemd watchdog: nothing a restart would fix. Every listener is serving
        and the queue runner's loop is running. (A full disk or Microsoft 365 trouble are not
        failures a restart fixes; they are answered with 451 and show in /healthz, /readyz.)"""
        servers = self._running.servers
        return bool(servers) and all(s.is_serving() for s in servers) and self.delivery.running

    @property
    def listeners(self) -> list[BoundListener]:
        return list(self._running.listeners)

    def health_sources(self) -> HealthSources:
        """What the admin server checks and shows; follows reloads (tokens, config)."""
        return HealthSources(
            config=self.current_config,
            listeners=self._listener_configs,
            bound=lambda: self.listeners,
            tokens=lambda: self.tokens.status(),
            spool=self.spool,
            queue=self.store.stats if self.store is not None else None,
            mailboxes=self.delivery.mailbox_report,
            degraded=self.delivery.degraded_reasons,
            history=self.delivery.history.search,
        )

    @property
    def max_message_size(self) -> int:
        """What EHLO advertises as SIZE: the configured limit, capped by what Graph can take
        (one request with `large_messages: reject`, 150 MB attachments with `upload`)."""
        return size_limit(self._config)

    async def start(self) -> None:
        """Recover the spool, start the workers, then bind the listeners."""
        loop = asyncio.get_running_loop()
        tls = self._tls_context()
        handler = self.handler
        try:
            await self._recover_store()
            for index, listener in enumerate(self._config.smtp.listeners):
                target = Listening(
                    "SMTP listener", f"smtp.listeners[{index}]", listener.address, listener.port
                )
                with binding(target):
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

    async def _recover_store(self) -> None:
        """Recover the store, start the workers (a spool that cannot open: CannotStartError)."""
        with spool_opening(self._config.delivery.spool_dir):
            await self.delivery.start()

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
        if self.store is not None:
            await self.store.close()  # releases the lock: another relay may now recover it
        await self.graph.close()
        self.tokens.close()
        for handle in self._retired:
            handle.cancel()
        for provider in self._retired_providers:
            provider.close()

    def _tls_context(self) -> ssl.SSLContext | None:
        files = self._config.smtp.tls
        if files is None:
            return None
        if self._server_tls is None:
            self._server_tls = server_tls_context(str(files.cert_file), str(files.key_file))
        return self._server_tls

    def reload(self, new: Config) -> list[str]:
        """Apply a new configuration without dropping a connection or a message (SIGHUP).

        Clients, routes, limits, auth objects (secrets and certificates re-read by the config
        loader), delivery timing and the server certificate take effect for the next command
        and the next TLS handshake: the config is one reference swapped at once, and the
        certificate is loaded into the very SSLContext the listeners use. What cannot change
        under a running process (listener addresses, delivery mode, spool location) keeps its
        old value and is returned as a list of notes to log; a restart applies it.
        """
        old = self._config
        notes: list[str] = []
        keep: dict[str, object] = {}
        if [(li.address, li.port, li.tls, li.auth) for li in new.smtp.listeners] != [
            (li.address, li.port, li.tls, li.auth) for li in old.smtp.listeners
        ]:
            notes.append("smtp.listeners changed: restart to apply")
        if (new.delivery.mode == "direct") != (old.delivery.mode == "direct") or (
            new.delivery.spool_dir != old.delivery.spool_dir
        ):
            notes.append("delivery.mode/spool_dir changed: restart to apply")
            keep["delivery"] = new.delivery.model_copy(
                update={"mode": old.delivery.mode, "spool_dir": old.delivery.spool_dir}
            )
        if (new.smtp.tls is None) != (old.smtp.tls is None):
            notes.append("smtp.tls added or removed: restart to apply")
        elif new.smtp.tls is not None and self._server_tls is not None:
            # New handshakes use the new chain; established sessions keep theirs.
            self._server_tls.load_cert_chain(
                str(new.smtp.tls.cert_file), str(new.smtp.tls.key_file)
            )
        if new.auth_objects != old.auth_objects:
            retired = self.tokens
            self.tokens = TokenProvider(new.auth_objects, metrics=self._sink)
            self.graph.reconfigure(self.tokens)
            # Token requests still running on the old provider finish first.
            self._retired.append(asyncio.get_running_loop().call_later(RETIRE_AFTER, retired.close))
            self._retired_providers.append(retired)
        self.limiter.total = new.smtp.max_connections
        self.limiter.per_client = new.smtp.max_connections_per_client
        self.data_memory.limit = int(new.smtp.max_data_memory)
        self._config = new.model_copy(update=keep) if keep else new
        # New budgets, routes or retry timing may let waiting mail go now.
        self.delivery.wake()
        return notes

    def _protocol_factory(
        self, handler: RelayHandler, listener: ListenerConfig, tls: ssl.SSLContext | None
    ) -> Callable[[], RelaySMTP]:
        loop = asyncio.get_running_loop()

        def factory() -> RelaySMTP:
            # Read per connection, so a reload (SIGHUP) applies to the next connection.
            smtp = self._config.smtp
            return RelaySMTP(
                handler,
                limiter=self.limiter,
                limits=SessionLimits.from_config(smtp),
                memory=self.data_memory,
                # an AUTH listener lets an address that is no client's in to log in
                outsiders_may_connect=listener.auth != "none",
                proxy_networks=smtp.proxy_networks if smtp.proxy_protocol else None,
                data_size_limit=self.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=self._config.smtp.hostname,
                ident="smtp-graph-relay",
                tls_context=tls if listener.tls == "starttls" else None,
                require_starttls=False,
                timeout=smtp.idle_timeout,
                auth_require_tls=True,
                auth_required=listener.auth == "required",  # MAIL before AUTH: 530 5.7.0
                # auth: none offers no mechanism (and EHLO no AUTH line, see RelayHandler)
                auth_exclude_mechanism=MECHANISMS if listener.auth == "none" else None,
                loop=loop,
            )

        return factory


async def serve_until_stopped(
    config_path: Path, config: Config, *, notifier: SystemdNotifier | None = None
) -> int:
    """`serve`: run until SIGTERM/SIGINT; SIGHUP reloads `config_path`. Returns the exit code.

    A reload that does not validate is logged with every problem and changes nothing: the
    running configuration stays in force. Under systemd (Type=notify) the relay reports READY=1
    once listening, RELOADING=1/READY=1 around each reload, STOPPING=1, and pings the watchdog.
    """
    notifier = notifier or SystemdNotifier.from_environ()
    metrics = RelayMetrics()
    service = RelayService(config, metrics=metrics)
    admin = AdminServer(config.admin, metrics=metrics, health=service.health_sources())
    stop = asyncio.Event()
    reload_requested = asyncio.Event()
    watchdog_stop = asyncio.Event()
    watchdog: asyncio.Task[None] | None = None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    loop.add_signal_handler(signal.SIGUSR1, reopen_log_files)  # logrotate: logging.file
    try:
        try:
            admin_target = Listening(
                "admin endpoint", "admin", config.admin.address, config.admin.port
            )
            with binding(admin_target):
                await admin.start()  # first: a taken admin port fails before any mail is accepted
            await service.start()
        except (CannotStartError, OSError) as exc:
            line = str(exc) if isinstance(exc, CannotStartError) else f"cannot start: {exc}"
            log.error("%s", line, extra={"event": "start_failed"})
            notifier.status(line)
            return 1
        log.info("relay started", extra={"event": "started"})
        notifier.ready(_status_line(service))
        watchdog = asyncio.create_task(
            run_watchdog(notifier, service.alive, watchdog_stop), name="systemd-watchdog"
        )
        while not stop.is_set():
            waiters = {
                asyncio.create_task(stop.wait()),
                asyncio.create_task(reload_requested.wait()),
            }
            _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if reload_requested.is_set() and not stop.is_set():
                reload_requested.clear()
                notifier.reloading("reloading configuration")
                outcome = await _reload(service, config_path)
                notifier.ready(f"{outcome}; {_status_line(service)}")
        notifier.stopping("stopping: finishing transactions and deliveries")
        watchdog_stop.set()
        log.info("stopping", extra={"event": "stopping"})
        await service.stop()
        log.info("stopped", extra={"event": "stopped"})
        return 0
    finally:
        watchdog_stop.set()
        if watchdog is not None:
            await watchdog
        await admin.stop()  # last: /healthz answers 503 while the relay drains
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)


def _status_line(service: RelayService) -> str:
    return "accepting mail on " + ", ".join(f"{b.host}:{b.port}" for b in service.listeners)


async def _reload(service: RelayService, config_path: Path) -> str:
    """Apply `config_path`; return one line for systemd's STATUS=."""
    try:
        new = await asyncio.to_thread(load_config, config_path)
    except ConfigError as exc:
        log.error(
            "reload rejected, the running configuration stays in force: %s",
            exc,
            extra={"event": "reload_rejected", "problems": [str(p) for p in exc.problems]},
        )
        return "reload rejected (see the log); the previous configuration stays in force"
    notes = service.reload(new)
    try:
        setup_logging(new.logging.level, new.logging.format, file=new.logging.file)
    except OSError as exc:  # the old handler stays: nothing is lost
        log.error("logging.file %s: %s; logging stays as it was", new.logging.file, exc.strerror)
    log.info(
        "configuration reloaded%s",
        "; " + "; ".join(notes) if notes else "",
        extra={"event": "reloaded", "notes": notes},
    )
    return "configuration reloaded" + (" (some changes need a restart)" if notes else "")
