# Why this module exists: the relay's retry, backoff, throttling and alerting paths (DESIGN §5)
# can only be tested if Microsoft misbehaves on demand. A FaultPlan is the script of that
# misbehaviour: failures queued in order, optionally aimed at one mailbox, plus slowness, a held
# gate and an Entra outage switch. The services consult it; tests and the CLI program it.
"""Programmable failures for the sandbox's Entra and Graph endpoints."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

__all__ = ["ABORT", "FaultPlan", "GraphFault", "TokenOutage"]

# `fail_graph(status=ABORT)` hangs up the connection without any HTTP response.
ABORT = 0


@dataclass(frozen=True, slots=True)
class GraphFault:
    """One scripted Graph answer. `status == ABORT` means: drop the connection instead."""

    status: int
    code: str
    message: str
    retry_after: str | None
    mailbox: str | None


@dataclass(frozen=True, slots=True)
class TokenOutage:
    """How Entra is down: 503 (with this Retry-After, if any), or connections dropped."""

    retry_after: str | None
    abort: bool


@dataclass(slots=True)
class _Queued:
    fault: GraphFault
    remaining: int


class FaultPlan:
    """Failures to inject, consumed in the order they were queued.

    Graph faults apply to sendMail requests that are authenticated and under the concurrency
    limit (as real Graph errors are), after `graph_latency` and any `hold_graph` gate.
    """

    def __init__(self) -> None:
        self._graph: list[_Queued] = []
        self._token_failures: list[list[int]] = []  # [status, remaining]
        self._latency = 0.0
        self._token_outage: TokenOutage | None = None
        self._released = asyncio.Event()
        self._released.set()
        self._upload_puts = 0  # upload-session PUTs seen so far
        self._upload_faults: dict[int, tuple[int, str | None]] = {}  # PUT number -> answer

    def fail_graph(
        self,
        status: int,
        code: str = "",
        message: str = "",
        *,
        retry_after: str | None = None,
        times: int = 1,
        mailbox: str | None = None,
    ) -> None:
        """The next `times` sendMail calls (to `mailbox` only, if given) answer `status` with a
        Graph error body; `status=0` aborts the connection instead of answering."""
        if times < 1:
            raise ValueError("times must be at least 1")
        if status != ABORT and not 100 <= status <= 599:
            raise ValueError(f"not an HTTP status: {status}")
        fault = GraphFault(
            status=status,
            code=code,
            message=message,
            retry_after=retry_after,
            mailbox=mailbox.lower() if mailbox else None,
        )
        self._graph.append(_Queued(fault, times))

    def fail_upload_chunk(
        self, n: int = 1, status: int = 503, *, retry_after: str | None = None
    ) -> None:
        """The `n`-th upload-session PUT from now (1 = the next) answers `status` without
        storing its bytes, as a failing front end would; the session stays usable."""
        if n < 1:
            raise ValueError("n counts from 1")
        if not 400 <= status <= 599:
            raise ValueError(f"not an HTTP error status: {status}")
        self._upload_faults[self._upload_puts + n] = (status, retry_after)

    def graph_latency(self, seconds: float) -> None:
        """Every accepted sendMail waits this long (asyncio sleep) before answering."""
        if seconds < 0:
            raise ValueError("latency cannot be negative")
        self._latency = seconds

    def hold_graph(self) -> None:
        """Accepted sendMail requests wait, holding their concurrency slot, until
        `release_graph()`: a deterministic way to have N requests in flight at once."""
        self._released.clear()

    def release_graph(self) -> None:
        self._released.set()

    def fail_token(self, status: int = 503, *, times: int = 1) -> None:
        """The next `times` token requests answer `status` with a non-JSON gateway body."""
        if times < 1:
            raise ValueError("times must be at least 1")
        if not 400 <= status <= 599:
            raise ValueError(f"not an HTTP error status: {status}")
        self._token_failures.append([status, times])

    def token_endpoint_down(
        self, down: bool, *, retry_after: str | None = None, abort: bool = False
    ) -> None:
        """While down, Entra (discovery and token endpoint) answers 503 to everything, with
        `Retry-After: retry_after` if given; with `abort` it drops each connection instead of
        answering, as a host that is gone does (the client sees a connection error)."""
        self._token_outage = TokenOutage(retry_after, abort) if down else None

    def clear(self) -> None:
        """Forget every queued failure, the latency, the hold and the outage."""
        self._graph.clear()
        self._upload_faults.clear()
        self._token_failures.clear()
        self._latency = 0.0
        self._token_outage = None
        self._released.set()

    # -- consulted by the services -------------------------------------------------------

    @property
    def latency(self) -> float:
        return self._latency

    @property
    def token_down(self) -> bool:
        return self._token_outage is not None

    @property
    def token_outage(self) -> TokenOutage | None:
        return self._token_outage

    async def wait_released(self) -> None:
        await self._released.wait()

    def take_graph_fault(self, mailbox: str) -> GraphFault | None:
        """Consume the first queued fault aimed at `mailbox` or at any mailbox."""
        wanted = mailbox.lower()
        for index, queued in enumerate(self._graph):
            if queued.fault.mailbox in (None, wanted):
                queued.remaining -= 1
                if queued.remaining == 0:
                    del self._graph[index]
                return queued.fault
        return None

    def take_upload_fault(self) -> tuple[int, str | None] | None:
        """Count one upload PUT; the (status, Retry-After) scripted for it, if any."""
        self._upload_puts += 1
        return self._upload_faults.pop(self._upload_puts, None)

    def take_token_fault(self) -> int | None:
        """Consume the next scripted token-endpoint failure status, if any."""
        if not self._token_failures:
            return None
        entry = self._token_failures[0]
        if entry[1] <= 1:
            self._token_failures.pop(0)
        else:
            entry[1] -= 1
        return entry[0]
