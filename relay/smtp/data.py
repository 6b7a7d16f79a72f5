"""One DATA phase as the session reads it: limits, deadline, memory reserved as bytes arrive.

Why this module exists: reading DATA is where the relay's memory is spent, so the rules for it
sit together: what a session may hold (`SessionLimits`), a deadline that pauses while the
session waits for memory (`Deadline`), and the read loop itself (`read_data`), which reserves
from `relay.smtp.memory` before it keeps a piece and, once a reservation is spilled, reads the
rest of the message without keeping it so that the client still gets its reply after the end
of data (RFC 5321 §4.2.5) instead of a reset connection. `DataPhase` is the DATA command of
`relay.smtp.session.RelaySMTP`, which subclasses it and sets the attributes it declares.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from aiosmtpd.smtp import SMTP, syntax

from relay.config.schema import SmtpConfig
from relay.core.errors import SmtpReply
from relay.core.message.limits import ContentLimits, ContentRefusedError, DataDecoder
from relay.core.replies import DATA_SYNTAX, DATA_TIMEOUT, NEED_RCPT
from relay.smtp.memory import DataMemoryBudget, Reservation
from relay.smtp.state import SessionHooks, client_ip_of

__all__ = ["NO_STORAGE", "DataPhase", "Deadline", "SessionLimits", "declared_size", "read_data"]

log = logging.getLogger("relay.smtp")

NO_STORAGE = SmtpReply(452, "4.3.1", "insufficient system storage, try again")

_SIZE_PARAMETER = re.compile(r"(?i)(?:^|\s)SIZE=(\d{1,20})(?=\s|$)")


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What one SMTP connection may do (DESIGN §8); built from `smtp:` by `from_config`."""

    content: ContentLimits = field(default_factory=ContentLimits)
    max_commands: int = 1000
    data_timeout: float = 600.0

    @classmethod
    def from_config(cls, smtp: SmtpConfig) -> SessionLimits:
        return cls(
            content=ContentLimits(
                max_header_bytes=smtp.max_header_size,
                max_mime_depth=smtp.max_mime_depth,
                bare_line_endings=smtp.bare_line_endings,
            ),
            max_commands=smtp.max_commands,
            data_timeout=smtp.data_timeout,
        )


def declared_size(arg: str | None) -> int | None:
    """The RFC 1870 SIZE= value of a MAIL FROM argument, if there is one."""
    match = _SIZE_PARAMETER.search(arg or "")
    return int(match.group(1)) if match else None


class Deadline:
    """The DATA deadline, paused while the session waits for memory (it is not reading)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, seconds: float, callback: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._left = seconds
        self._handle: asyncio.TimerHandle | None = loop.call_later(seconds, callback)

    def pause(self) -> None:
        if self._handle is not None:
            self._left = max(0.0, self._handle.when() - self._loop.time())
            self._handle.cancel()
            self._handle = None

    def resume(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_later(self._left, self._callback)

    def cancel(self) -> None:
        self.pause()


# Waits for room: (reserve, received bytes) -> reserved? (the session bounds the wait)
RoomWaiter = Callable[[Callable[..., Awaitable[bool]], int], Awaitable[bool]]


async def read_data(
    reader: asyncio.StreamReader,
    decoder: DataDecoder,
    reservation: Reservation,
    *,
    limits: ContentLimits,
    deadline: Deadline,
    wait_for_room: RoomWaiter,
    line_seen: Callable[[], None],
) -> bool | None:
    """Feed the stream to `decoder` up to the end of DATA, reserving memory as it comes.

    True: the message was kept; False: it could not get room, so the rest was read without
    keeping it; None: the client went away. `limits` are the decoder's (a spill replaces it
    with one that keeps nothing). `line_seen` is called after each piece (the
    session refreshes its idle timer from it).
    """
    kept, partial = True, False
    while True:
        try:
            piece = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as overrun:
            # A line longer than the reader's buffer limit: take it in pieces (DESIGN §7
            # tolerates long lines; the size limit still bounds them).
            piece = await reader.read(overrun.consumed)
        except asyncio.IncompleteReadError:
            return None
        if kept and not reservation.try_grow(len(piece)):
            # No room: stop taking from the stream (asyncio pauses the transport once its
            # small buffer is full) until room comes; the DATA deadline waits too.
            deadline.pause()
            kept = await wait_for_room(reservation.grow, len(piece))
            deadline.resume()
            if not kept:
                decoder = _discarding(limits, partial)
        if decoder.feed(piece):
            return kept
        partial = not piece.endswith(b"\r\n")
        line_seen()


def _discarding(limits: ContentLimits, partial: bool) -> DataDecoder:
    """A decoder that keeps nothing and only finds the end of DATA (after a spill)."""
    decoder = DataDecoder(replace(limits, max_size=1))  # the first line is over it
    if partial:  # the stream is inside a long line: a following ".\r\n" does not end DATA
        decoder.feed(b"x")
    return decoder


class DataPhase(SMTP):
    """RFC 5321 DATA for `RelaySMTP`: reserved, bounded in time, read through our decoder."""

    _hooks: SessionHooks
    _memory: DataMemoryBudget
    _limits: SessionLimits
    _refresh_every: float
    _refreshed: float

    def _close_now(self, reply: SmtpReply) -> None:
        """Send `reply`, close the connection and stop reading what else the client sent."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(f"{reply}\r\n".encode())
            transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd command name
        """RFC 5321 §4.1.1.4 DATA, read through `relay.core.message.limits.DataDecoder`."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.session is not None
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(str(NEED_RCPT))
            return
        if arg:
            await self.push(str(DATA_SYNTAX))
            return
        with self._hooks.receiving_data():  # a shutdown lets this message finish
            await self._receive_data()

    async def _receive_data(self) -> None:
        assert self.session is not None
        reservation = self._memory.open()
        try:
            reply = await self._receive(reservation)
        finally:
            reservation.release()  # handed on, refused, or the client went away
        self.envelope = self._create_envelope()
        if reply is not None:
            await self.push(reply)

    async def _receive(self, reservation: Reservation) -> str | None:
        """354, the content, and the final reply (None: the client went away)."""
        assert self.session is not None
        assert self.envelope is not None
        declared = declared_size(" ".join(self.envelope.mail_options))
        if declared is not None and not await self._room(reservation.admit, declared):
            return self._no_storage()
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        decoder = DataDecoder(replace(self._limits.content, max_size=self.data_size_limit or None))
        deadline = Deadline(self.loop, self._limits.data_timeout, self._data_deadline_passed)
        try:
            read = await read_data(
                self._reader,
                decoder,
                reservation,
                limits=self._limits.content,
                deadline=deadline,
                wait_for_room=self._room,
                line_seen=self._line_seen,
            )
        finally:
            deadline.cancel()
        if read is None:
            if self.transport is not None:
                self.transport.close()
            return None
        if not read:
            return self._no_storage()
        try:
            # No local reference: the handler drops the raw bytes once it has prepared them.
            self.envelope.content = self.envelope.original_content = decoder.content()
        except ContentRefusedError as refused:
            self._hooks.record_refusal(self.session, refused.reply)
            return str(refused.reply)
        del decoder
        return await self._hooks.handle_DATA(self, self.session, self.envelope)

    def _line_seen(self) -> None:
        now = self.loop.time()
        if now - self._refreshed >= self._refresh_every:  # idle counts from the last DATA line
            self._reset_timeout()
            self._refreshed = now

    async def _room(self, reserve: Callable[..., Awaitable[bool]], size: int) -> bool:
        """Wait up to `data_timeout` for room; the idle timer must not close us meanwhile."""
        wait = self._limits.data_timeout
        self._reset_timeout(wait + self._timeout_duration)
        try:
            return await reserve(size, within=wait)
        finally:
            self._reset_timeout()

    def _no_storage(self) -> str:
        assert self.session is not None
        log.warning(
            "no room in smtp.max_data_memory for a message from %s",
            client_ip_of(self.session),
            extra={"event": "data_memory_full", "client_ip": client_ip_of(self.session)},
        )
        self._hooks.record_refusal(self.session, NO_STORAGE)
        return str(NO_STORAGE)

    def _data_deadline_passed(self) -> None:
        if self.session is not None:
            self._hooks.record_refusal(self.session, DATA_TIMEOUT)
        self._close_now(DATA_TIMEOUT)
