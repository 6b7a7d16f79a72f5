# Why this module exists: Graph and the draft endpoints must refuse exactly when Microsoft
# would and answer in Microsoft's shapes, so that the relay's budgets and its handling of limit
# answers (DESIGN §5: they pause the mailbox, never bounce) are tested against the real rules.
# The Throttle keeps one rolling window per limit and key, counts violations, renders the
# answers as GraphErrors, and lands NDRs when Exchange is set to accept-then-refuse.
"""Enforcement of SandboxLimits for the sandbox's Graph endpoints."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from .limits import NDR_TEXTS, Ndr, RollingWindow, SandboxLimits, replace_limits
from .messages import GraphError

__all__ = ["App", "Throttle", "message_id_of"]

App = tuple[str, str]  # (tenant id, client id) of the calling app


class Throttle:
    """Rolling windows per mailbox (messages, recipients) and per app and mailbox (requests,
    upload bytes). `clock` is the sandbox's injected clock; `on_ndr` is awaited when an NDR
    lands (the mail folder writes it)."""

    def __init__(self, limits: SandboxLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.violations: Counter[str] = Counter()
        self.ndrs: list[Ndr] = []
        self.on_ndr: Callable[[Ndr], Awaitable[None]] | None = None
        self._clock = clock
        self._messages: dict[str, RollingWindow] = {}
        self._recipients: dict[str, RollingWindow] = {}
        self._requests: dict[tuple[str, str, str], RollingWindow] = {}
        self._uploads: dict[tuple[str, str, str], RollingWindow] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def set_limits(self, changes: dict[str, object]) -> SandboxLimits:
        self.limits = replace_limits(self.limits, changes)
        return self.limits

    # -- Graph (per app and mailbox) ---------------------------------------------------------

    def admit_request(self, app: App, mailbox: str) -> None:
        """Count one request on the mailbox, or raise 429 when the request limit is reached.
        A request refused for this limit is not counted, so a client that honours
        Retry-After gets in when the window says it may."""
        limits, now = self.limits, self._clock()
        window = self._requests.setdefault((*app, mailbox.lower()), RollingWindow())
        wait = window.wait(now, 1, limits.requests_per_10_minutes, limits.requests_window)
        if wait:
            self.violations["requests_per_10_minutes"] += 1
            raise GraphError(
                429,
                "ApplicationThrottled",
                "Application is over its request limit of "
                f"{limits.requests_per_10_minutes} requests per {_seconds(limits.requests_window)}"
                " for this mailbox.",
                retry_after=_retry_after(wait),
            )
        window.add(now, 1)

    def concurrency_error(self) -> GraphError:
        """The answer to a request over MailboxConcurrency (counted as a violation)."""
        self.violations["concurrent_requests"] += 1
        return GraphError(
            429,
            "ApplicationThrottled",
            "Application is over its MailboxConcurrency limit.",
            retry_after="1",
        )

    def admit_upload(self, app: App, mailbox: str, size: int) -> None:
        """Count `size` bytes received in an upload-session PUT, or raise 429 IncomingBytes."""
        limits, now = self.limits, self._clock()
        window = self._uploads.setdefault((*app, mailbox.lower()), RollingWindow())
        wait = window.wait(now, size, limits.upload_per_5_minutes, limits.upload_window)
        if wait:
            self.violations["upload_per_5_minutes"] += 1
            raise GraphError(
                429,
                "ApplicationThrottled",
                "Application is over its IncomingBytes limit.",
                retry_after=_retry_after(wait),
            )
        window.add(now, size)

    # -- Exchange (per mailbox, across apps) -------------------------------------------------

    def admit_message(self, mailbox: str, recipients: int) -> str | None:
        """Count a message the sandbox is about to accept. None: accepted and counted. Over a
        limit: raise its Graph error, or (exchange_answer "ndr") return the limit's name; the
        caller answers 202 and calls `refuse_later`."""
        limits, now, key = self.limits, self._clock(), mailbox.lower()
        messages = self._messages.setdefault(key, RollingWindow())
        wait = messages.wait(now, 1, limits.messages_per_minute, limits.messages_window)
        if wait:
            self.violations["messages_per_minute"] += 1
            if limits.exchange_answer == "ndr":
                return "messages_per_minute"
            raise GraphError(
                429,
                "ErrorExceededMessageLimit",
                "Cannot send mail: the mailbox has exceeded its sending limit of "
                f"{limits.messages_per_minute} messages per {_seconds(limits.messages_window)}.",
                retry_after=_retry_after(wait),
            )
        daily = self._recipients.setdefault(key, RollingWindow())
        if daily.wait(now, recipients, limits.recipients_per_day, limits.recipients_window):
            self.violations["recipients_per_day"] += 1
            if limits.exchange_answer == "ndr":
                return "recipients_per_day"
            # 403, as Exchange answers it; the relay must still treat it as a budget, not a
            # permanent refusal (DESIGN §5).
            raise GraphError(
                403,
                "ErrorExceededMessageLimit",
                "Cannot send mail: the mailbox has reached its limit of "
                f"{limits.recipients_per_day} recipients per "
                f"{_seconds(limits.recipients_window)}.",
            )
        messages.add(now, 1)
        daily.add(now, recipients)
        return None

    async def refuse_later(
        self, mailbox: str, limit: str, message_id: str | None, subject: str
    ) -> None:
        """Land the NDR for a message accepted with 202 and then refused for `limit`: at once
        with ndr_delay 0 (before the 202 goes out), else that many seconds later."""
        delay = self.limits.ndr_delay
        if not delay:
            await self._land(mailbox, limit, message_id, subject)
            return
        task = asyncio.create_task(self._land_after(delay, mailbox, limit, message_id, subject))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        """Drop NDRs that have not landed yet (the sandbox stops)."""
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)

    async def _land_after(
        self, delay: float, mailbox: str, limit: str, message_id: str | None, subject: str
    ) -> None:
        await asyncio.sleep(delay)
        await self._land(mailbox, limit, message_id, subject)

    async def _land(self, mailbox: str, limit: str, message_id: str | None, subject: str) -> None:
        status, text = NDR_TEXTS[limit]
        ndr = Ndr(mailbox, limit, status, text, self._clock(), message_id, subject)
        self.ndrs.append(ndr)
        if self.on_ndr is not None:
            await self.on_ndr(ndr)


def message_id_of(mime: bytes | None, json_body: dict[str, Any] | None) -> str | None:
    """The Message-ID of a submitted message, if it has one."""
    if mime is not None:
        value = BytesHeaderParser(policy=compat32).parsebytes(mime).get("Message-ID")
        return str(value).strip() if value else None
    message = (json_body or {}).get("message")
    value = message.get("internetMessageId") if isinstance(message, dict) else None
    return value if isinstance(value, str) and value else None


def _retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


def _seconds(window: float) -> str:
    if window == 60:
        return "minute"
    if window == 86_400:
        return "day"
    if window % 60 == 0:
        return f"{int(window // 60)} minutes"
    return f"{window:g} seconds"
