"""systemd service notifications (sd_notify) without libsystemd (DESIGN §9).

Why this module exists: the unit runs the relay as `Type=notify`, so systemd only considers it
started when the relay says `READY=1` (listeners bound, spool recovered), shows our `STATUS=` in
`systemctl status`, tracks `systemctl reload` through `RELOADING=1` ... `READY=1`, and, with
`WatchdogSec=`, restarts the relay when the `WATCHDOG=1` pings stop. Linking libsystemd for four
datagrams is not worth a C dependency, so this module speaks the documented protocol itself
(sd_notify(3), sd_watchdog_enabled(3)):

- `$NOTIFY_SOCKET` names an AF_UNIX datagram socket: a file system path, or an abstract-namespace
  name when it starts with `@` (the `@` stands for the leading NUL byte).
- A message is newline-separated `KEY=VALUE` assignments in one datagram.
- `$WATCHDOG_USEC` is the watchdog timeout; it applies to this process only when `$WATCHDOG_PID`
  is unset or equals our pid (otherwise we inherited a parent's setting). The manual recommends
  pinging every half of the timeout.

systemd going away (or never having been there) must never stop mail: every send is
non-blocking, and failures are logged once per outage and never raised. Without
`$NOTIFY_SOCKET` every method is a no-op, so `serve` behaves the same outside systemd.

The watchdog pings come from a task on the relay's event loop on purpose: if the loop is blocked,
the pings stop and systemd restarts the relay, which is exactly the failure a watchdog is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

__all__ = ["SystemdNotifier", "run_watchdog"]

log = logging.getLogger("relay.systemd")

# systemd reads notifications into a buffer of a few KiB and drops longer datagrams; a status
# line is for `systemctl status`, so a short cap loses nothing an operator would read.
MAX_STATUS_BYTES = 1024


def _monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock MONOTONIC_USEC= is defined on."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _sanitise(text: str) -> str:
    """One line of printable text: STATUS= ends at the first newline, so none may be inside."""
    line = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text).strip()
    data = line.encode("utf-8")
    if len(data) <= MAX_STATUS_BYTES:
        return line
    return data[:MAX_STATUS_BYTES].decode("utf-8", errors="ignore")


def _socket_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET -> an AF_UNIX address, or None when we cannot speak to it."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])  # abstract namespace
    if value.startswith("/"):
        return value
    # Relative paths are refused by sd_notify too; "vsock:" (systemd 254+, for VMs) needs
    # AF_VSOCK, which a relay on a host never gets from its service manager.
    return None


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    raw = environ.get("WATCHDOG_USEC")
    if raw is None:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner.strip() != str(pid):
        return None  # inherited from the process that systemd actually supervises
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning(
            "ignoring WATCHDOG_USEC=%r: not a positive number of microseconds",
            raw,
            extra={"event": "systemd_watchdog_invalid"},
        )
        return None
    return usec


class SystemdNotifier:
    """Sends sd_notify messages to the service manager; a no-op outside systemd.

    Thread-compatible but meant for the event loop's thread. No method ever raises because
    systemd is missing or gone; the first failure of an outage is logged at warning level.
    """

    def __init__(
        self,
        notify_socket: str | None,
        *,
        watchdog_usec: int | None = None,
        monotonic_usec: Callable[[], int] = _monotonic_usec,
    ) -> None:
        """`notify_socket` as in $NOTIFY_SOCKET; `watchdog_usec` only if it applies to us."""
        self._monotonic_usec = monotonic_usec
        self._watchdog_usec = watchdog_usec
        self._address: str | bytes | None = None
        self._failing = False
        if notify_socket:
            self._address = _socket_address(notify_socket)
            if self._address is None:
                log.warning(
                    "NOTIFY_SOCKET=%r is not an AF_UNIX socket path or @name; "
                    "systemd notifications are off",
                    notify_socket,
                    extra={"event": "systemd_notify_unsupported"},
                )

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> SystemdNotifier:
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID (default: this process's)."""
        env = os.environ if environ is None else environ
        return cls(
            env.get("NOTIFY_SOCKET"),
            watchdog_usec=_watchdog_usec(env, os.getpid() if pid is None else pid),
        )

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to notify."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None if not supervised."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self, status: str) -> None:
        """Start-up (or a reload) is complete: the relay accepts mail."""
        self._send(f"READY=1\nSTATUS={_sanitise(status)}")

    def status(self, text: str) -> None:
        """Free-form one-line state for `systemctl status`."""
        self._send(f"STATUS={_sanitise(text)}")

    def reloading(self, status: str | None = None) -> None:
        """A reload started; send `ready()` when it is done (also when it failed).

        MONOTONIC_USEC= lets systemd 253+ (`Type=notify-reload`) match this message to the
        reload it asked for; older managers ignore the field.
        """
        message = f"RELOADING=1\nMONOTONIC_USEC={self._monotonic_usec()}"
        if status is not None:
            message += f"\nSTATUS={_sanitise(status)}"
        self._send(message)

    def stopping(self, status: str) -> None:
        """Shutdown started: systemd shows the unit as deactivating."""
        self._send(f"STOPPING=1\nSTATUS={_sanitise(status)}")

    def watchdog(self) -> None:
        """One keep-alive ping; nothing is sent when the watchdog is not ours."""
        if self.watchdog_interval is not None:
            self._send("WATCHDOG=1")

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            # One socket per message, as sd_notify does: a few messages a minute, and no
            # descriptor to leak or to inherit.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # A full or stuck manager queue must cost us a lost status, never a stall.
                sock.setblocking(False)
                sock.sendto(message.encode("utf-8"), self._address)
        except OSError as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            self._failing = True
            log.log(
                level,
                "cannot notify systemd (%s); the relay keeps running",
                exc.strerror or exc.__class__.__name__,
                extra={"event": "systemd_notify_failed", "notify": message.split("\n", 1)[0]},
            )
            return
        if self._failing:
            self._failing = False
            log.info("systemd notifications work again", extra={"event": "systemd_notify_ok"})


HealthCheck = Callable[[], bool | Awaitable[bool]]


async def _is_healthy(healthy: HealthCheck, interval: float) -> bool:
    """Run the check; an exception or a check slower than one interval counts as unhealthy."""
    deadline = asyncio.timeout(interval)
    try:
        async with deadline:
            result = healthy()
            if inspect.isawaitable(result):
                result = await result
        return bool(result)
    except TimeoutError:
        if not deadline.expired():
            log.exception("health check failed", extra={"event": "watchdog_health_error"})
            return False
        log.warning(
            "health check did not answer within %.1fs",
            interval,
            extra={"event": "watchdog_health_timeout"},
        )
        return False
    except Exception:
        log.exception("health check failed", extra={"event": "watchdog_health_error"})
        return False


async def run_watchdog(
    notifier: SystemdNotifier, healthy: HealthCheck, stop: asyncio.Event
) -> None:
    """Ping WATCHDOG=1 every `notifier.watchdog_interval` while `healthy()`, until `stop` is set.

    Returns at once when systemd does not supervise us. An unhealthy check skips that ping
    (and logs it); if the relay stays unhealthy for WatchdogSec=, systemd restarts it.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    log.info(
        "systemd watchdog: pinging every %.1fs",
        interval,
        extra={"event": "watchdog_started", "interval": interval},
    )
    was_healthy = True
    while not stop.is_set():
        if await _is_healthy(healthy, interval):
            notifier.watchdog()
            if not was_healthy:
                log.info("healthy again; watchdog pings resume", extra={"event": "watchdog_ok"})
            was_healthy = True
        else:
            was_healthy = False
            log.warning(
                "unhealthy: watchdog ping skipped; systemd restarts the relay if this persists",
                extra={"event": "watchdog_skipped"},
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
